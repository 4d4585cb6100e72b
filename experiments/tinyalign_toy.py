"""TinyAlign vs a plain connector on a toy image-feature / text alignment problem (arXiv 2505.12884's
claims: lower training loss, and baseline-level accuracy with 40 % of the data).

Toy problem. An "image" has 3 attributes with 6 values each; its features are 4 patches of a
fixed random non-linear encoding of the attributes plus noise. The prompt is one question token
(which attribute?), the answer is one token (that attribute's value). A small causal transformer
(2 layers, width 32, trained from scratch together with the connector) reads
[image tokens, (memory tokens), question] and is trained on the answer token only.

TinyAlign: memory bank of the training pairs used (key: fused pooled image features and question
embedding, 0.4 / 0.6; value: pooled image features + a fixed embedding of the pair's answer), top-4
retrieval, a training pair never retrieves itself. Same model, optimiser, steps and batches for both.
Measured per (method, data fraction, seed): mean training loss over the first 20 % of steps
(convergence) and over the last 10 %, and
held-out loss / accuracy on 1,000 fresh pairs (the bank holds training pairs only).

`OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python experiments/tinyalign_toy.py [--seeds 3] [--steps 1500]`
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from thinkling.models.tinyalign import (
    IGNORE_INDEX,
    MemoryBank,
    TinyAlign,
    pool,
    splice_prefix,
)

N_ATTR, N_VALUES, PATCHES, FEAT, D = 3, 6, 4, 16, 32
VOCAB = N_ATTR + N_VALUES  # question tokens 0..2, answer tokens 3..8
TRAIN_POOL, TEST = 2000, 1000


def make_data(n: int, seed: int, encoder_seed: int = 1234):
    """(image features [n, P, F], question ids [n], answer ids [n]); the encoder is fixed across splits."""
    g = torch.Generator().manual_seed(encoder_seed)
    table = torch.randn(N_ATTR, N_VALUES, PATCHES, FEAT, generator=g)
    mix = torch.randn(PATCHES, FEAT, FEAT, generator=g) / FEAT**0.5
    g = torch.Generator().manual_seed(seed)
    attrs = torch.randint(0, N_VALUES, (n, N_ATTR), generator=g)
    raw = sum(table[a, attrs[:, a]] for a in range(N_ATTR))  # [n, P, F]
    feats = torch.tanh(torch.einsum("npf,pfg->npg", raw, mix)) + 0.6 * torch.randn(n, PATCHES, FEAT, generator=g)
    question = torch.randint(0, N_ATTR, (n,), generator=g)
    answer = N_ATTR + attrs.gather(1, question[:, None]).squeeze(1)
    return feats, question, answer


class ToyVLM(nn.Module):
    """Prefix tokens + [question, answer] through a small causal transformer."""

    def __init__(self, connector: nn.Module):
        super().__init__()
        self.connector = connector
        self.embed = nn.Embedding(VOCAB, D)
        layer = nn.TransformerEncoderLayer(D, 2, 64, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(D, VOCAB)

    def loss(self, feats, question, answer, exclude=None, reduce=True):
        if isinstance(self.connector, TinyAlign):
            prefix = self.connector(feats, self.question_key(question), exclude=exclude)
        else:
            prefix = self.connector(feats)
        text = self.embed(torch.stack([question, answer], 1))
        labels = torch.stack([torch.full_like(answer, IGNORE_INDEX), answer], 1)  # the question is prompt
        inputs, labels, _ = splice_prefix(prefix, text, labels)
        causal = nn.Transformer.generate_square_subsequent_mask(inputs.shape[1])
        logits = self.head(self.body(inputs, mask=causal, is_causal=True))
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none").view(len(answer), -1)
        per_row = ce.sum(1)  # one labelled position per row
        correct = logits[:, -2].argmax(-1) == answer
        return (per_row.mean() if reduce else per_row), correct

    @staticmethod
    def question_key(question):
        return QUESTION_KEYS[question]


QUESTION_KEYS = torch.randn(N_ATTR, 8, generator=torch.Generator().manual_seed(99))  # fixed text embeddings
ANSWER_VALUES = torch.randn(VOCAB, 8, generator=torch.Generator().manual_seed(98))  # fixed answer embeddings


def connector():
    return nn.Sequential(nn.Linear(FEAT, D), nn.GELU(), nn.Linear(D, D))


def run(method: str, fraction: float, seed: int, steps: int, batch: int, lr: float) -> dict:
    feats, question, answer = make_data(TRAIN_POOL, seed=0)
    n = int(round(fraction * TRAIN_POOL))
    feats, question, answer = feats[:n], question[:n], answer[:n]
    torch.manual_seed(seed)
    if method == "tinyalign":
        values = torch.cat([pool(feats), ANSWER_VALUES[answer]], 1)
        bank = MemoryBank.build(feats, QUESTION_KEYS[question], values)
        model = ToyVLM(TinyAlign(connector(), bank, lm_dim=D, top_k=4))
    else:
        model = ToyVLM(connector())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1000 + seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, n, (batch,), generator=g)
        loss, _ = model.loss(feats[idx], question[idx], answer[idx], exclude=idx if method == "tinyalign" else None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    test = make_data(TEST, seed=7)
    with torch.no_grad():
        test_loss, correct = model.loss(*test)
    head, tail = losses[: max(1, steps // 5)], losses[-max(1, steps // 10):]
    return {"method": method, "fraction": fraction, "seed": seed, "train_pairs": n,
            "train_loss_first20": sum(head) / len(head), "train_loss_end": sum(tail) / len(tail),
            "test_loss": test_loss.item(),
            "test_acc": correct.float().mean().item()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--fractions", default="0.2,0.4,1.0")
    p.add_argument("--out", default=None, help="write every run as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    t0 = time.time()
    for fraction in [float(f) for f in args.fractions.split(",")]:
        for method in ("plain", "tinyalign"):
            for seed in range(args.seeds):
                rows.append(run(method, fraction, seed, args.steps, args.batch, args.lr))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n{time.time() - t0:.0f} s\n")
    print("| data | method | train loss, first 20 % of steps | train loss, last 10 % | held-out loss "
          "| held-out accuracy (min-max) |")
    print("|---|---|---:|---:|---:|---:|")
    for fraction in sorted({r["fraction"] for r in rows}):
        for method in ("plain", "tinyalign"):
            rs = [r for r in rows if r["fraction"] == fraction and r["method"] == method]
            keys = ("train_loss_first20", "train_loss_end", "test_loss", "test_acc")
            mean = {k: sum(r[k] for r in rs) / len(rs) for k in keys}
            spread = {k: (min(r[k] for r in rs), max(r[k] for r in rs)) for k in ("test_acc",)}
            print(f"| {fraction:.0%} ({rs[0]['train_pairs']}) | {method} | {mean['train_loss_first20']:.3f} | "
                  f"{mean['train_loss_end']:.4f} | "
                  f"{mean['test_loss']:.3f} | {mean['test_acc']:.3f} ({spread['test_acc'][0]:.3f}-"
                  f"{spread['test_acc'][1]:.3f}) |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
