"""What the lab's experiment scripts share: output folder, tables, training a tiny model on a task."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from thinkling.config import SFTConfig
from thinkling.eval.report import markdown_table
from thinkling.models.base import SamplingParams
from thinkling.models.tiny import TinyPolicy
from thinkling.rollout.scoring import complete
from thinkling.train.sft import collate, sft_examples, train_sft


def experiment_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """`--quick` (a one-minute smoke run) and `--out` for every experiment script.

    Experiments run single-threaded: tiny models gain nothing from a second
    thread and the machine is shared.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smoke version (about a minute)")
    parser.add_argument("--out", default=None, help="output folder (default runs/lab/<name>)")
    torch.set_num_threads(1)
    return parser.parse_args(argv)


def output_dir(name: str, out: str | None) -> Path:
    path = Path(out or f"runs/lab/{name}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_table(path: Path, title: str, header: list[str], rows: list[list], results: dict) -> str:
    """Write `table.md` and `results.json` into `path` and return the Markdown (the scripts print it)."""
    table = f"## {title}\n\n{markdown_table(header, rows)}\n"
    (path / "table.md").write_text(table)
    (path / "results.json").write_text(json.dumps(results, indent=2))
    return table


def train_policy(model: dict, task, problems, sft: SFTConfig, seed: int, progress=None) -> TinyPolicy:
    """A fresh tiny character model trained by ordinary SFT on `problems` (the `thinkling sft` path)."""
    policy = TinyPolicy.create(model, seed=seed)
    train_sft(policy, sft_examples(policy, task, problems), sft, seed=seed, progress=progress)
    return policy


@torch.no_grad()
def greedy_accuracy(policy: TinyPolicy, task, problems, max_new_tokens: int, batch_size: int = 250) -> float:
    """Fraction of problems whose greedy completion (KV-cache sampler) verifies."""
    done = complete(policy, task, problems, SamplingParams(max_new_tokens, 0.0), batch_size=batch_size)
    return sum(c.correct for c in done) / len(done)


@torch.no_grad()
def completion_loss(policy: TinyPolicy, task, problems, batch_size: int = 250) -> float:
    """Held-out SFT loss: mean cross-entropy (nats) per completion token (eos included), teacher-forced."""
    total, count = 0.0, 0.0
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        ids, mask, weights = collate(sft_examples(policy, task, chunk), policy.pad_id)
        logits = policy.logits(ids, mask)[:, :-1].float()
        ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view_as(ids[:, 1:])
        total += float((ce * weights[:, 1:]).sum())
        count += float(weights[:, 1:].sum())
    return total / count
