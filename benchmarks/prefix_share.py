"""Seconds per RL update with and without prefix sharing (`rl.share_prompt`).

    python benchmarks/prefix_share.py                    # tiny + hf, G = 4 and 8
    python benchmarks/prefix_share.py --models hf --groups 8 --repeats 5

The same `RLTrainer.update` (μ = 1, β = 0, AdamW, whole batch in one pass) on the same fixed
groups: random prompts of `--prompt-len` tokens, completions of C/2..C tokens (a quarter of
them exactly C). Two policies, each fp32 on the CPU:

- tiny: the quick-start tiny transformer (d_model 96, 3 layers, 4 heads), character vocabulary;
- hf: a random Llama shaped like SmolLM2-135M per layer (hidden 576, 9 heads, 3 kv heads,
  MLP 1536, vocab 49152, tied embeddings) but `--hf-layers` layers instead of 30.

Sides alternate within each repeat (the order rotating), weights reset before every update,
and the table shows wall-clock medians, min–max spread and the ratio of medians, and the
median CPU times (process time: steadier than wall time on a loaded machine). `tokens` counts the
positions the transformer layers run on: G·(P+C) rows unshared, (P-1) + G·(C+1) shared.
`|Δ mean logp|`, `|Δ grad_norm|`: the two sides' update stats (`entropy_estimate`, the mean
log-prob of the sampled tokens, and the gradient norm), float rounding if both compute the same.
(The loss itself says nothing here: with μ = 1 the ratio is exactly 1 on both sides.)
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
from _common import Recorder, footer, header, release_memory, rotate, table

from thinkling.config import RLConfig
from thinkling.models.tiny import TinyPolicy
from thinkling.rollout.groups import Group
from thinkling.rollout.scoring import Completion
from thinkling.train.common import make_optimizer
from thinkling.train.rl import RLTrainer, resolve_knobs


def tiny_policy():
    return TinyPolicy.create({"d_model": 96, "n_layers": 3, "n_heads": 4, "max_seq_len": 320}, seed=0)


def hf_policy(layers: int):
    import transformers

    from thinkling.models.hf import HFPolicy

    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                      max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=100000.0,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    tokenizer = _char_tokenizer()
    return HFPolicy(transformers.LlamaForCausalLM(config).eval(), tokenizer)


def _char_tokenizer():
    """Any tokenizer with an eos and pad will do: the benchmark feeds token ids directly."""
    import transformers
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="</s>", unk_token="<unk>")


def make_groups(vocab: int, prompts: int, group: int, prompt_len: int, max_new: int, eos: int) -> list[Group]:
    g = torch.Generator().manual_seed(0)
    groups = []
    for i in range(prompts):
        prefix = torch.randint(3, vocab, (prompt_len + int(torch.randint(-8, 9, (1,), generator=g)),), generator=g).tolist()
        comps = []
        for j in range(group):
            n = max_new if j % 4 == 0 else int(torch.randint(max_new // 2, max_new + 1, (1,), generator=g))
            comps.append(Completion("", torch.randint(3, vocab, (n - 1,), generator=g).tolist() + [eos], False, None, False))
        rewards = torch.rand(group, generator=g).tolist()
        groups.append(Group(None, prefix, comps, rewards=rewards, position=i))
    return groups


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "hf"], choices=["tiny", "hf"])
    ap.add_argument("--groups", nargs="+", type=int, default=[4, 8], help="completions per prompt (G)")
    ap.add_argument("--prompts", type=int, default=4, help="groups per update")
    ap.add_argument("--prompt-len", type=int, default=150)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--hf-layers", type=int, default=4)
    ap.add_argument("--checkpointing", action="store_true", help="hf: gradient checkpointing on (as the SmolLM2 recipes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    header("RL update: prefix sharing (rl.share_prompt) vs not", ["benchmarks/prefix_share.py", *sys.argv[1:]])
    print(f"prompts={args.prompts} prompt_len={args.prompt_len}±8 max_new_tokens={args.max_new_tokens} "
          f"hf_layers={args.hf_layers} hf_gradient_checkpointing={args.checkpointing} repeats={args.repeats} μ=1 β=0 fp32\n")
    rec = Recorder()
    rows = []
    for model in args.models:
        base = tiny_policy() if model == "tiny" else hf_policy(args.hf_layers)
        if model == "hf":
            base.gradient_checkpointing = args.checkpointing
        vocab = base.model.config.vocab_size
        start = copy.deepcopy(base.model.state_dict())
        for G in args.groups:
            groups = make_groups(vocab, args.prompts, G, args.prompt_len, args.max_new_tokens, base.eos_id)
            row = f"{model} G={G}"
            sides = {}
            for share in (False, True):
                cfg = RLConfig(prompts_per_step=args.prompts, group_size=G, lr=1e-4, beta=0.0,
                               max_new_tokens=args.max_new_tokens, share_prompt=share)
                opt = make_optimizer(base.model, cfg.lr, cfg.weight_decay)
                sides["shared" if share else "unshared"] = RLTrainer(base, None, [], cfg, resolve_knobs(cfg), opt, seed=0)
            stats = {}
            for rep in range(args.repeats + 1):  # the first round warms up, unmeasured
                for name in rotate(list(sides), rep):
                    base.model.load_state_dict(start)
                    release_memory()
                    with rec.measure(f"{row} {name}") as m:
                        cpu = time.process_time()
                        out = sides[name].update(groups, 0, 1)
                        cpu = time.process_time() - cpu
                    stats[name] = out
                    if rep:
                        rec.add(row, name, "s", m["seconds"])
                        rec.add(row, name, "cpu", cpu)
            P = sum(len(g.prefix) for g in groups)
            C = sum(len(c.ids) for g in groups for c in g.completions)
            tokens = {"unshared": G * P + C, "shared": P - len(groups) + C + len(groups) * G}
            un, sh = rec.median(row, "unshared", "s"), rec.median(row, "shared", "s")
            cu, cs = rec.median(row, "unshared", "cpu"), rec.median(row, "shared", "cpu")
            rows.append([row, f"{un:.2f} ({rec.spread(row, 'unshared', 's')})", f"{sh:.2f} ({rec.spread(row, 'shared', 's')})",
                         f"{un / sh:.2f}x", f"{cu:.2f} / {cs:.2f} ({cu / cs:.2f}x)", f"{tokens['unshared']} / {tokens['shared']} ({tokens['unshared'] / tokens['shared']:.2f}x)",
                         f"{abs(stats['unshared']['entropy_estimate'] - stats['shared']['entropy_estimate']):.1e}",
                         f"{abs(stats['unshared']['grad_norm'] - stats['shared']['grad_norm']):.1e}"])
            print(f"  {row}: unshared {un:.2f} s, shared {sh:.2f} s", flush=True)
        del base
    print()
    print(table(["update", "unshared s (spread)", "shared s (spread)", "speed-up", "CPU s un / sh (ratio)", "tokens unshared / shared",
                 "|Δ mean logp|", "|Δ grad_norm|"], rows))
    footer(rec)


if __name__ == "__main__":
    main()
