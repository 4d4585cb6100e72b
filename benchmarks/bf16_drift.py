"""How far bf16 decoding moves the sampling distribution from the fp32 policy.

    python benchmarks/bf16_drift.py

Samples 8 chain-task completions of 48 tokens from SmolLM2-135M (fp32 engine),
then replays exactly those tokens through each decoding variant and compares
its next-token distributions with the fp32 model's own forward pass (what the
RL update differentiates): mean / max KL(fp32 || variant), mean total
variation, mean |Δ log p| of the sampled tokens, and top-1 agreement.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F
from _common import header

from thinkling.models.base import SamplingParams
from thinkling.models.hf import HFPolicy
from thinkling.models.hf_engine import RolloutEngine
from thinkling.rollout.prompts import prompt_text
from thinkling.tasks import get_task


def replay(generate, prompts, trajectories, steps) -> torch.Tensor:
    """Logits `[B, steps, V]` a sampler computes while being forced along `trajectories`."""
    forced = torch.tensor(trajectories)
    seen = []

    def processor(logits, history):
        seen.append(logits.float().clone())
        out = torch.full_like(logits, -float("inf"))
        out[torch.arange(len(logits)), forced[:, history.shape[1]]] = 0
        return out

    generate(prompts, SamplingParams(max_new_tokens=steps, temperature=0, logits_processor=processor))
    return torch.stack(seen, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=48)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    header("bf16 decoding drift vs the fp32 policy", ["benchmarks/bf16_drift.py", *sys.argv[1:]])
    policy = HFPolicy.load(args.model, device="cpu")
    problems = get_task("chain").problems(8, seed=1, difficulty=[3, 4, 5])
    prompts = [policy.encode_prompt(prompt_text(p)) for p in problems]

    def no_eos(logits, history):
        logits[:, policy.eos_id] = -float("inf")
        return logits

    trajectories = policy.generate(prompts, SamplingParams(max_new_tokens=args.steps, seed=0, logits_processor=no_eos))
    with torch.no_grad():
        ref = torch.stack([
            policy.model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) - 1 + args.steps].float()
            for p, c in zip(prompts, trajectories)
        ])
    def engine(plain_head=False, **kw):
        eng = RolloutEngine(policy.model, eos_id=policy.eos_id, pad_id=policy.pad_id, **kw)
        if plain_head:  # the bf16 head without the offset trick, for comparison
            eng.weights().head = _PlainBf16Head(policy.model.lm_head.weight)
        return eng.generate

    hf16 = HFPolicy(copy.deepcopy(policy.model).to(torch.bfloat16), policy.tokenizer)
    variants = {
        "engine fp32": engine(),
        "engine bf16 (offset-compensated bf16 head)": engine(dtype=torch.bfloat16),
        "engine bf16, fp32 head": engine(dtype=torch.bfloat16, head_dtype=torch.float32),
        "engine bf16, plain bf16 head": engine(plain_head=True, dtype=torch.bfloat16),
        "transformers generate, model.to(bfloat16)": hf16.generate_reference,
    }
    print(f"{'variant':45s} {'KL mean':>9s} {'KL max':>9s} {'TV mean':>9s} {'|dlogp|':>9s} {'top-1':>7s}")
    sampled = torch.tensor(trajectories)[..., None]
    for name, generate in variants.items():
        logits = replay(generate, prompts, trajectories, args.steps)
        lp, lq = F.log_softmax(ref, -1), F.log_softmax(logits, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        tv = 0.5 * (lp.exp() - lq.exp()).abs().sum(-1)
        dlogp = (lp.gather(-1, sampled) - lq.gather(-1, sampled)).abs()
        top1 = (ref.argmax(-1) == logits.argmax(-1)).float().mean()
        print(f"{name:45s} {kl.mean():9.2e} {kl.max():9.2e} {tv.mean():9.2e} {dlogp.mean():9.2e} {top1:7.4f}")


class _PlainBf16Head:
    """Logits straight out of a bf16 matmul (rounded to bf16)."""

    def __init__(self, weight):
        self.weight = weight.detach().to(torch.bfloat16)

    def __call__(self, hidden):
        return F.linear(hidden.to(torch.bfloat16), self.weight)


if __name__ == "__main__":
    main()
