"""Experiment 2: standard attention vs SSA at equal size and steps across context lengths.

Two-layer character models are trained by ordinary SFT on `chain` (k single-digit
+/- operations; each step must fetch the k-th operation from the prompt, so the
context a step retrieves from grows with k) on k = 1..6, one model per
architecture and seed with identical batches (SSA with its temperature
parameters at the base learning rate and at 10x it), then tested per k, including
k = 8 and 10 (longer than any training prompt). Metrics: held-out completion
loss (nats per token) and greedy accuracy. Claim (SSA, arXiv 2411.12892): lower
loss and better retrieval at the same size, with a larger gain at longer
context. `thinkling lab run ssa-context [--quick]`
"""

from __future__ import annotations

import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from thinkling.config import SFTConfig
from thinkling.lab.common import (
    completion_loss,
    experiment_args,
    greedy_accuracy,
    output_dir,
    train_policy,
    write_table,
)
from thinkling.tasks import get_task

MODELS = {  # SSA's temperature parameters at the base learning rate, and at 10x it (the reference code's choice)
    "standard": {"attention": "standard"},
    "SSA": {"attention": "ssa", "attention_options": {"lr_scale": 1.0}},
    "SSA lr x10": {"attention": "ssa", "attention_options": {"lr_scale": 10.0}},
}


def main(argv: list[str] | None = None) -> None:
    args = experiment_args(__doc__.splitlines()[0], argv)
    out = output_dir("ssa-context", args.out)
    quick = args.quick
    train_lengths = list(range(1, 5 if quick else 7))
    test_lengths = [2, 4, 6] if quick else [2, 4, 6, 8, 10]
    seeds = [0] if quick else [0, 1]
    sft = SFTConfig(steps=150 if quick else 800, batch_size=48, lr=3e-3, warmup_steps=50)
    base = {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 192}
    task = get_task("chain")
    tests = {k: task.problems(200 if quick else 300, seed=100, difficulty=k) for k in test_lengths}
    results, params = {}, {}
    for label, attention in MODELS.items():
        for seed in seeds:
            t0 = time.time()
            train = task.problems(30000, seed=seed, difficulty=train_lengths)
            policy = train_policy({**base, **attention}, task, train, sft, seed=seed)
            params[label] = policy.model.num_parameters()
            r = {k: {"accuracy": greedy_accuracy(policy, task, probs, 10 * k + 12),
                     "loss": completion_loss(policy, task, probs)} for k, probs in tests.items()}
            results.setdefault(label, {})[seed] = r
            print(f"{label} seed {seed}: " + ", ".join(f"k={k}: {v['accuracy']:.3f}/{v['loss']:.3f}" for k, v in r.items())
                  + f" ({time.time() - t0:.0f} s)", flush=True)

    def mean(label, k, key):
        return sum(results[label][s][k][key] for s in seeds) / len(seeds)

    rows = [[k, *[mean(label, k, "loss") for label in MODELS], *[mean(label, k, "accuracy") for label in MODELS]]
            for k in test_lengths]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, ylabel in zip(axes, ("loss", "accuracy"), ("completion loss (nats/token)", "greedy accuracy")):
        for i, label in enumerate(MODELS):
            for s in seeds:
                ax.plot(test_lengths, [results[label][s][k][key] for k in test_lengths], color=f"C{i}", alpha=0.3,
                        marker=".")
            ax.plot(test_lengths, [mean(label, k, key) for k in test_lengths], color=f"C{i}", marker="o",
                    label=f"{label} ({params[label]:,} params, mean of {len(seeds)} seeds)")
        ax.axvline(max(train_lengths), color="grey", ls=":", lw=1)
        ax.set(xlabel="operations k (context length)", ylabel=ylabel, title=f"chain, 2 layers, {sft.steps} steps")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ssa.png", dpi=120)
    overhead = params["SSA"] / params["standard"] - 1
    header = ["k", *[f"loss {label}" for label in MODELS], *[f"acc {label}" for label in MODELS]]
    title = (f"Standard vs SSA on chain (trained on k={train_lengths[0]}-{train_lengths[-1]}, "
             f"mean of {len(seeds)} seeds; SSA adds {overhead:.2%} parameters)")
    print(write_table(out, title, header, rows, {"params": params, "steps": sft.steps, "seeds": seeds,
                                                 "train_lengths": train_lengths, "results": results}))
    print(f"plot: {out / 'ssa.png'}")


if __name__ == "__main__":
    main()
