"""TinyAlign vs the plain connector on the tiny VLM, `shapes` / `mood` (docs/vlm.md#tinyalign-on-the-tiny-vlm).

Both are the recipe models of recipes/vlm/sft-shapes.yaml and tinyalign-shapes.yaml (same seed: same
initial weights, TinyAlign adds the memory connector), trained by ordinary SFT (`train.sft`) on the
first 20 / 40 / 60 / 100 % of one pool of training pictures, with the same steps, batches and lr.
TinyAlign's bank holds exactly the pairs that run trains on (built as `thinkling sft` does).
Recorded per (method, data share, seed): the training-loss curve, the first step at which the
10-step moving mean of the loss is at or below `--threshold`, greedy held-out accuracy on fresh
pictures, and what the model sees: the share of held-out shapes whose cell, colour and form its
scene description names right (chance for colour and form: 0.25).

`--retrieval` measures the bank alone, no training: for each held-out picture, how often its top_k
retrieved training pairs hold its answer (their majority vote; the best match's) and each of its shapes
(same cell, colour and form), against top_k pairs drawn at random; and the blind floor, the training
loss (nats per target token) of a model that knows the task's statistics but never looks at the
picture: log 3 for the shape count, log C(9, k) for the filled cells, log 4 for each colour and each
form, everything else predicted exactly.

`--table runs.json ...` prints the table of saved runs again (several files: one table), e.g. with
another `--threshold`, or a third seed trained later with `--from-seed 2 --seeds 1`.

`OMP_NUM_THREADS=1 PYTHONPATH=src python experiments/tinyalign_shapes.py [--quick] [--seeds 2] [--retrieval]`
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from statistics import mean

import torch

from thinkling.config import SFTConfig
from thinkling.eval.report import markdown_table
from thinkling.lab.common import output_dir, write_table
from thinkling.models import images as image_store
from thinkling.models.base import SamplingParams
from thinkling.models.tiny_vlm import TinyVLMPolicy
from thinkling.rollout.prompts import prompt_text
from thinkling.rollout.scoring import complete
from thinkling.tasks import get_task
from thinkling.tasks.templates import spans_text
from thinkling.train.sft import build_memory, sft_examples, train_sft

MODEL = {"d_model": 96, "n_layers": 3, "n_heads": 4, "max_seq_len": 192,
         "vision": {"image_size": 36, "patch_size": 12, "d_model": 64, "n_layers": 2, "n_heads": 4,
                    "connector_hidden": 128}}
METHODS = ("plain", "tinyalign")


def perception(problems, completions) -> dict:
    """Share of shapes whose cell / colour / form the description (line i = shape i) names right."""
    right, shapes = {"cell": 0, "colour": 0, "form": 0}, 0
    for p, c in zip(problems, completions):
        lines = c.text.split("\n")
        for i, (colour, form, cell) in enumerate(p.meta["scene"]):
            words = lines[i].split() if i < len(lines) else []
            shapes += 1
            for k, (key, want) in enumerate((("cell", cell), ("colour", colour), ("form", form))):
                right[key] += len(words) > k and words[k] == want
    return {k: v / shapes for k, v in right.items()}


def steps_to(losses: list[float], threshold: float, window: int = 10) -> int | None:
    for i in range(window, len(losses) + 1):
        if mean(losses[i - window : i]) <= threshold:
            return i
    return None


def run(method: str, share: float, seed: int, task, pool, heldout, args) -> dict:
    t0 = time.time()
    model = {**MODEL, "tinyalign": {"top_k": args.top_k}} if method == "tinyalign" else MODEL
    policy = TinyVLMPolicy.create(model, seed=seed)
    train = pool[: round(share * len(pool))]
    build_memory(policy, task, train)
    cfg = SFTConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=args.steps // 10)
    losses: list[float] = []
    train_sft(policy, sft_examples(policy, task, train), cfg, seed=seed, progress=lambda s, loss: losses.append(loss))
    with torch.no_grad():
        done = complete(policy, task, heldout, SamplingParams(args.max_new_tokens, 0.0), batch_size=100)
    return {"method": method, "share": share, "seed": seed, "pairs": len(train), "losses": losses,
            "final_loss": mean(losses[-10:]), "steps_to_threshold": steps_to(losses, args.threshold),
            "accuracy": sum(c.correct for c in done) / len(done), **perception(heldout, done),
            "seconds": time.time() - t0}


def retrieval(task, pool, heldout, top_k: int) -> dict:
    """What the retrieved pairs hold about a held-out picture, vs as many random training pairs."""
    policy = TinyVLMPolicy.create({**MODEL, "tinyalign": {"top_k": top_k}}, seed=0)
    build_memory(policy, task, pool)  # entry e is pool[e]: every pair has a picture
    rng = random.Random(0)
    out = {}
    for name in ("retrieved", "random"):
        vote = top1 = found = shapes = 0
        for p in heldout:
            handles = [image_store.register(image) for image in p.images]
            entries = policy.retrieve(handles, prompt_text(p)) if name == "retrieved" else \
                rng.sample(range(len(pool)), top_k)
            answers = [pool[e].answer for e in entries]
            vote += Counter(answers).most_common(1)[0][0] == p.answer
            top1 += answers[0] == p.answer
            near = {shape for e in entries for shape in pool[e].meta["scene"]}
            found += sum(shape in near for shape in p.meta["scene"])
            shapes += len(p.meta["scene"])
        out[name] = {"vote_accuracy": vote / len(heldout), "top1_accuracy": top1 / len(heldout),
                     "shapes_found": found / shapes}
    return out


def summary(rows: list[dict], threshold: float) -> tuple[list[str], list[list]]:
    header = ["data", "method", "loss, last 10 steps", f"steps to loss <= {threshold}", "held-out accuracy",
              "colour right", "form right", "cell right", "per seed: accuracy"]
    table = []
    for share in sorted({r["share"] for r in rows}):
        for method in METHODS:
            rs = [r for r in rows if r["share"] == share and r["method"] == method]
            reached = [r["steps_to_threshold"] for r in rs if r["steps_to_threshold"] is not None]
            to = f"{mean(reached):.0f}" + (f" ({len(reached)}/{len(rs)} seeds)" if len(reached) < len(rs) else "") \
                if reached else "not reached"
            table.append([f"{share:.0%} ({rs[0]['pairs']})", method, f"{mean(r['final_loss'] for r in rs):.3f}", to,
                          f"{mean(r['accuracy'] for r in rs):.3f}", f"{mean(r['colour'] for r in rs):.3f}",
                          f"{mean(r['form'] for r in rs):.3f}", f"{mean(r['cell'] for r in rs):.3f}",
                          " / ".join(f"{r['accuracy']:.3f}" for r in rs)])
    return header, table


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke version (a few minutes)")
    p.add_argument("--out", default=None, help="output folder (default runs/lab/tinyalign-shapes)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--from-seed", type=int, default=0)
    p.add_argument("--table", nargs="+", default=None, help="runs.json files: print their table, train nothing")
    p.add_argument("--shares", default="0.2,0.4,0.6,1.0")
    p.add_argument("--pool", type=int, default=2000, help="training pictures at 100 %%")
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--threshold", type=float, default=0.6)
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--retrieval", action="store_true", help="measure the bank's retrieval only (no training)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.shares, args.pool, args.heldout, args.steps = 1, "0.2,1.0", 300, 40, 20
    torch.set_num_threads(1)
    if args.table:
        rows = [r for f in args.table for r in json.loads(open(f).read())]
        for r in rows:
            r["steps_to_threshold"] = steps_to(r["losses"], args.threshold)
        header, table = summary(rows, args.threshold)
        print(markdown_table(header, table))
        return
    out = output_dir("tinyalign-shapes", args.out)
    task = get_task("shapes", question="mood")
    pool = task.problems(args.pool, 0, [1, 2, 3])
    heldout = task.problems(args.heldout, 1, [1, 2, 3])
    if args.retrieval:
        nats = sum(math.log(3 * math.comb(9, len(p.meta["scene"]))) + len(p.meta["scene"]) * 2 * math.log(4)
                   for p in pool)
        tokens = sum(len(spans_text(task.target_spans(p))) + 1 for p in pool)  # characters + eos
        print(f"blind floor: {nats / tokens:.4f} nats per target token")
        for share in [float(s) for s in args.shares.split(",")]:
            print(json.dumps({"share": share, **retrieval(task, pool[: round(share * len(pool))], heldout, args.top_k)}))
        return
    rows = []
    for seed in range(args.from_seed, args.from_seed + args.seeds):
        for share in [float(s) for s in args.shares.split(",")]:
            for method in METHODS:
                rows.append(run(method, share, seed, task, pool, heldout, args))
                r = rows[-1]
                print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
                (out / "runs.json").write_text(json.dumps(rows))  # every finished run, as it finishes
    majority = max(sum(p.answer == a for p in heldout) for a in {p.answer for p in heldout}) / len(heldout)
    header, table = summary(rows, args.threshold)
    print(write_table(out, f"TinyAlign vs plain connector, shapes/mood 1-3 shapes, {args.steps} steps x {args.batch} "
                      f"(majority label: {majority:.3f})", header, table, {"args": vars(args), "runs": rows}))


if __name__ == "__main__":
    main()
