"""Training tokens/s of the tiny transformer: fp32 vs bf16 autocast, 1 vs 2 threads.

    python benchmarks/tiny_train.py
    python benchmarks/tiny_train.py --models demo --steps 30 --repeats 5

An SFT step (forward, completion-only cross-entropy, backward, clip, AdamW) on
chain-task examples, batch 64, as `thinkling sft` runs it. Models:
  demo   d_model 96, 3 layers (the quick-start's ~0.4 M parameters)
  3m     d_model 256, 4 layers (~3.2 M parameters)
Every (dtype, threads) side trains its own copy from the same initialisation
on the same batches; sides alternate within each repeat. Tokens/s counts real
(non-padding) tokens of the batch.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from _common import Recorder, footer, header, rotate, table

from thinkling.models.tiny import TinyPolicy
from thinkling.tasks import get_task
from thinkling.train.common import make_optimizer, step_generator
from thinkling.train.sft import collate, sft_examples, weighted_ce

MODELS = {
    "demo": {"d_model": 96, "n_layers": 3, "n_heads": 4, "max_seq_len": 192},
    "3m": {"d_model": 256, "n_layers": 4, "n_heads": 4, "max_seq_len": 192},
}


def train_steps(policy, optimizer, examples, first: int, steps: int, batch: int, bf16: bool) -> tuple[float, int]:
    """Run `steps` SFT steps; returns (seconds, real tokens)."""
    model = policy.model
    model.train()
    tokens = 0
    t0 = time.perf_counter()
    for step in range(first, first + steps):
        idx = torch.randint(len(examples), (batch,), generator=step_generator(0, step)).tolist()
        ids, mask, weights = collate([examples[i] for i in idx], policy.pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = policy.logits(ids, mask)
        loss = weighted_ce(logits, ids, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        tokens += int(mask.sum())
    return time.perf_counter() - t0, tokens


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="demo,3m")
    ap.add_argument("--steps", type=int, default=20, help="training steps per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args(argv)
    header("tiny transformer training tokens/s", ["benchmarks/tiny_train.py", *sys.argv[1:]])
    task = get_task("chain")
    problems = task.problems(5000, seed=0, difficulty=[1, 2, 3, 4, 5, 6, 7, 8])
    sides = [(dtype, threads) for threads in (1, 2) for dtype in ("fp32", "bf16")]
    names = [f"{d} {t}t" for d, t in sides]
    rec = Recorder()
    for model_name in args.models.split(","):
        config = MODELS[model_name]
        copies = {}
        for name in names:
            policy = TinyPolicy.create(config, seed=0)
            copies[name] = (policy, make_optimizer(policy.model, 1e-3, 0.0))
        examples = sft_examples(copies[names[0]][0], task, problems)
        params = copies[names[0]][0].model.num_parameters()
        print(f"model {model_name}: {params / 1e6:.2f} M parameters, {config}")
        for name, (policy, opt) in copies.items():  # warm-up
            torch.set_num_threads(int(name.split()[1][0]))
            train_steps(policy, opt, examples, 0, 2, args.batch, name.startswith("bf16"))
        for rep in range(args.repeats):
            for i, name in enumerate(rotate(names, rep)):
                dtype, threads = name.split()
                torch.set_num_threads(int(threads[0]))
                policy, opt = copies[name]
                with rec.measure(name):
                    seconds, tokens = train_steps(policy, opt, examples, 2 + rep * args.steps, args.steps, args.batch,
                                                  dtype == "bf16")
                rec.add(model_name, name, "tok/s", tokens / seconds)
                print(f"  rep {rep} {name:8s} {tokens / seconds:8.0f} tok/s", flush=True)
    torch.set_num_threads(1)
    rows = []
    for model_name in args.models.split(","):
        base = rec.median(model_name, "fp32 1t", "tok/s")
        for name in names:
            med = rec.median(model_name, name, "tok/s")
            rows.append([model_name, name, f"{med:.0f}", rec.spread(model_name, name, "tok/s"), f"{med / base:.2f}x"])
    print()
    print(table(["model", "side", "train tok/s (median)", "min–max", "vs fp32 1 thread"], rows))
    footer(rec)


if __name__ == "__main__":
    main()
