"""What a trained tiny VLM sees in `shapes` pictures (docs/vlm.md).

Two measurements on a saved `tiny_vlm` policy (a run folder or a policy folder):
1. its greedy scene descriptions on held-out `mood` problems (seed 1, 1-5 shapes), compared line
   by line with the scene: the share of shapes whose cell, colour and form it names right;
2. a linear probe (least squares, one-hot targets) on the connector's output at the shape's cell
   of one-shape pictures: can colour and form be read from the image tokens at all?
   `--fresh` probes a freshly initialised model of the recipe's size instead.

`.venv/bin/python experiments/vlm_perception.py runs/vlm-clgrpo/1-sft [--problems 100] [--probe 1200]`
`.venv/bin/python experiments/vlm_perception.py --completions runs/x/samples/step_000060.jsonl --difficulty 1,2,3`
(measurement 1 only, on completions already written, e.g. by the composite VLM)
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from thinkling.files import read_jsonl
from thinkling.models import images as image_store
from thinkling.models import load_policy
from thinkling.models.base import SamplingParams
from thinkling.models.tiny_vlm import TinyVLMPolicy
from thinkling.rollout.prompts import prompt_ids
from thinkling.tasks import get_task
from thinkling.tasks.shapes import CELLS, COLOURS, FORMS

RECIPE_MODEL = {"d_model": 96, "n_layers": 3, "n_heads": 4, "max_seq_len": 192,
                "vision": {"image_size": 36, "patch_size": 12, "d_model": 64, "n_layers": 2, "n_heads": 4,
                           "connector_hidden": 128}}


def descriptions(policy, n: int) -> dict:
    problems = get_task("shapes").problems(n, 1, [1, 2, 3, 4, 5])
    outs = policy.generate([prompt_ids(policy, p) for p in problems], SamplingParams(max_new_tokens=160, temperature=0))
    return score_descriptions(problems, [policy.decode(ids) for ids in outs])


def score_descriptions(problems, completions: list[str]) -> dict:
    """Line i of a completion against shape i of the scene (reading order): the share of shapes
    whose cell, colour and form it names right."""
    right = {"cell": 0, "colour": 0, "form": 0}
    shapes = 0
    for p, text in zip(problems, completions):
        lines = text.split("\n")
        for i, (colour, form, cell) in enumerate(p.meta["scene"]):
            words = lines[i].split() if i < len(lines) else []
            shapes += 1
            for k, (key, want) in enumerate((("cell", cell), ("colour", colour), ("form", form))):
                right[key] += len(words) > k and words[k] == want
    return {"shapes": shapes, **{k: v / shapes for k, v in right.items()}}


def scored_file(path: str, difficulty: list[int]) -> dict:
    """`score_descriptions` of the completions an eval or a run's samples file holds (held-out
    `mood` problems of seed 1 at `difficulty`, matched by id): no model needed, so any backend's
    completions are scored the same way."""
    rows = [r for _, r in read_jsonl(path) if "completion" in r]
    problems = {p.id: p for p in get_task("shapes").problems(len(rows), 1, difficulty)}
    return score_descriptions([problems[r["id"]] for r in rows], [r["completion"] for r in rows])


def probe(policy, n: int) -> dict:
    problems = get_task("shapes").problems(n, 5, [1])
    with torch.no_grad():
        feats = policy.model.image_embeddings([image_store.register(p.images[0]) for p in problems])
    x = np.stack([feats[i, CELLS.index(p.meta["scene"][0][2])].numpy() for i, p in enumerate(problems)])
    x = np.c_[x, np.ones(len(x))]
    fit = 2 * n // 3
    out = {}
    for key, index, classes in (("colour", 0, list(COLOURS)), ("form", 1, list(FORMS))):
        y = np.array([classes.index(p.meta["scene"][0][index]) for p in problems])
        w = np.linalg.lstsq(x[:fit], np.eye(len(classes))[y[:fit]], rcond=None)[0]
        out[key] = float(((x[fit:] @ w).argmax(1) == y[fit:]).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="a saved tiny_vlm policy or run folder")
    parser.add_argument("--fresh", action="store_true", help="probe a freshly initialised model instead")
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--probe", type=int, default=1200)
    parser.add_argument("--completions", default=None, help="score the completions of this eval / samples JSONL "
                        "instead (any backend; problems rebuilt by id)")
    parser.add_argument("--difficulty", default="1,2,3,4,5", help="with --completions: the eval's difficulties")
    args = parser.parse_args()
    if args.completions:
        d = scored_file(args.completions, [int(x) for x in args.difficulty.split(",")])
        print(f"{d['shapes']} shapes described: cell right {d['cell']:.3f}, colour {d['colour']:.3f}, "
              f"form {d['form']:.3f}")
        return
    torch.set_num_threads(1)
    policy = TinyVLMPolicy.create(RECIPE_MODEL, seed=0) if args.fresh else load_policy(args.model)
    if not args.fresh:
        d = descriptions(policy, args.problems)
        print(f"{d['shapes']} shapes described: cell right {d['cell']:.3f}, colour {d['colour']:.3f}, "
              f"form {d['form']:.3f}")
    p = probe(policy, args.probe)
    print(f"linear probe on image tokens: colour {p['colour']:.3f}, form {p['form']:.3f}")


if __name__ == "__main__":
    main()
