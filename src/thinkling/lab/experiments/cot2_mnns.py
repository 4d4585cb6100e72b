"""Experiment 3: CoT2 vs discrete CoT on minimum non-negative sum (digits 1-9, m = 4).

Same 2-layer TinyTransformer and token layout for both (`thinkling.lab.cot2`):
discrete CoT = SFT on one optimal trace, greedy decoding and pass@k from 16
samples; CoT2 = CSFT on the distributions of all partial sums, deterministic
soft decoding (pass@1). Then GRPO with multi-token sampling from the d=24 CoT2
checkpoint. Test problems (20 % of all 9^4 digit tuples) are never trained on.
Claim (arXiv 2505.23648): ≈95 % vs ≈70 % at d=24; CoT2 pass@1 ≈ discrete pass@16;
GRPO improves further. `thinkling lab run cot2-mnns [--quick]`
"""

from __future__ import annotations

import copy
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from thinkling.eval.metrics import pass_at_k
from thinkling.lab import cot2
from thinkling.lab.common import experiment_args, output_dir, write_table

SAMPLES = 16
KS = (1, 2, 4, 8, 16)


def accuracy(predicted: torch.Tensor, answer: torch.Tensor) -> float:
    return (predicted == answer).float().mean().item()


def discrete_pass_at_k(model, data: cot2.MNNSData, seed: int) -> dict[int, float]:
    """Unbiased pass@k from SAMPLES temperature-1 discrete samples per test problem."""
    g = torch.Generator().manual_seed(seed)
    correct = sum((cot2.sample_discrete(model, data.prompts, generator=g).answer == data.answer).long()
                  for _ in range(SAMPLES))
    return {k: sum(pass_at_k(SAMPLES, int(c), k) for c in correct) / len(data) for k in KS}


def mts_accuracy(model, data: cot2.MNNSData, K: int, seed: int) -> float:
    """Mean answer reward of one multi-token-sampling rollout per test problem."""
    roll = cot2.sample_multi_token(model, data.prompts, K, generator=torch.Generator().manual_seed(seed))
    return accuracy(roll.answer, data.answer)


def main(argv: list[str] | None = None) -> None:
    args = experiment_args(__doc__.splitlines()[0], argv)
    out = output_dir("cot2-mnns", args.out)
    layout = cot2.MNNSLayout(m=4, max_digit=9)
    train_set, test_set = cot2.split_problems(layout, test_fraction=0.2, seed=0)
    train, test = cot2.make_data(layout, train_set), cot2.make_data(layout, test_set)
    dims = (24,) if args.quick else (16, 24, 32)
    steps = 300 if args.quick else 2000
    grpo = {"K": 4, "steps": 20 if args.quick else 150, "prompts_per_step": 32, "group_size": 8, "lr": 3e-4}
    results, rows, models = {"dims": {}}, [], {}
    for d in dims:
        r = {}
        for mode in ("discrete", "cot2"):
            t0 = time.time()
            model = cot2.new_model(layout, d, n_layers=2, n_heads=2, seed=0)
            losses = cot2.train_supervised(model, train, mode=mode, steps=steps, batch_size=128, lr=3e-3, seed=0)
            models[(mode, d)] = model
            if mode == "discrete":
                r["discrete_greedy"] = accuracy(cot2.sample_discrete(model, test.prompts, greedy=True).answer, test.answer)
                r["discrete_pass@k"] = discrete_pass_at_k(model, test, seed=1)
            else:
                r["cot2"] = accuracy(cot2.soft_decode(model, test.prompts), test.answer)
                r["cot2_mts_K4"] = mts_accuracy(model, test, K=4, seed=1)
            r[f"{mode}_final_loss"] = sum(losses[-50:]) / 50
            print(f"d={d} {mode}: {({k: v for k, v in r.items() if k.startswith(mode)})} ({time.time() - t0:.0f} s)",
                  flush=True)
        results["dims"][d] = r
        rows.append([d, r["discrete_greedy"], r["discrete_pass@k"][1], r["discrete_pass@k"][16], r["cot2"],
                     r["cot2_mts_K4"]])

    d_rl = 24
    model = copy.deepcopy(models[("cot2", d_rl)])
    before = {"soft": accuracy(cot2.soft_decode(model, test.prompts), test.answer),
              "mts": mts_accuracy(model, test, grpo["K"], seed=2)}
    t0 = time.time()
    rewards = cot2.train_grpo(model, train, seed=0, **grpo)
    after = {"soft": accuracy(cot2.soft_decode(model, test.prompts), test.answer),
             "mts": mts_accuracy(model, test, grpo["K"], seed=2)}
    print(f"GRPO (K={grpo['K']}, d={d_rl}): {before} -> {after} ({time.time() - t0:.0f} s)", flush=True)
    results["grpo"] = {"d": d_rl, **grpo, "before": before, "after": after, "train_rewards": rewards}

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(dims, [results["dims"][d]["cot2"] for d in dims], marker="o", label="CoT2 (soft, pass@1)")
    ax.plot(dims, [results["dims"][d]["discrete_greedy"] for d in dims], marker="o", label="discrete CoT (greedy)")
    ax.plot(dims, [results["dims"][d]["discrete_pass@k"][16] for d in dims], marker="o", ls="--",
            label="discrete CoT pass@16")
    ax.set(xlabel="embedding dim d", ylabel="test accuracy", title="mnns m=4, 2 layers", xticks=list(dims))
    ax = axes[1]
    ax.plot(KS, [results["dims"][d_rl]["discrete_pass@k"][k] for k in KS], marker="o", label="discrete pass@k")
    ax.axhline(results["dims"][d_rl]["cot2"], color="C0", ls=":", label="CoT2 pass@1")
    ax.set(xscale="log", xlabel="k", ylabel="test accuracy", title=f"pass@k at d={d_rl}", xticks=list(KS))
    ax.set_xticklabels([str(k) for k in KS])
    ax = axes[2]
    window = 10
    smooth = [sum(rewards[max(0, i - window + 1) : i + 1]) / len(rewards[max(0, i - window + 1) : i + 1])
              for i in range(len(rewards))]
    ax.plot(range(1, len(rewards) + 1), smooth, label=f"train reward (K={grpo['K']}, mean of {window})")
    ax.axhline(after["soft"], color="C1", ls=":", label="test soft accuracy after")
    ax.axhline(before["soft"], color="grey", ls=":", label="test soft accuracy before")
    ax.set(xlabel="GRPO step", ylabel="accuracy", title=f"GRPO with multi-token sampling, d={d_rl}")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "cot2.png", dpi=120)
    header = ["d", "discrete greedy", "discrete pass@1", "discrete pass@16", "CoT2 (soft)", "CoT2 MTS K=4"]
    table = write_table(out, "CoT2 vs discrete CoT on mnns (digits 1-9, m=4), test accuracy", header, rows, results)
    table += (f"\nGRPO with multi-token sampling (K={grpo['K']}, {grpo['steps']} steps) from the d={d_rl} CoT2 "
              f"checkpoint: soft {before['soft']:.3f} -> {after['soft']:.3f}, "
              f"MTS K={grpo['K']} {before['mts']:.3f} -> {after['mts']:.3f}\n")
    (out / "table.md").write_text(table)
    print(table)
    print(f"plot: {out / 'cot2.png'}")


if __name__ == "__main__":
    main()
