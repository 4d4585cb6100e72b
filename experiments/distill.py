"""Distilled chain-of-thought data vs the raw solutions, on the tiny model (docs/curricula.md).

1. Teacher: the quick-start SFT policy (`recipes/quickstart/sft.yaml`, trained once and reused,
   the checkpoint `experiments/quickstart_seeds.py` uses): it knows every step, but samples each
   one right only part of the time.
2. `thinkling distill` with that teacher on N `chain` questions (1-4 steps): up to `--tries`
   samples each at `--temperature`, kept when the `strict` verifier accepts the whole trace.
   Reported: acceptance by number of steps.
3. Two students, fresh small models with identical settings, trained with `train: jsonl,
   verbatim: true` on (a) the raw solutions of all N questions (the task's expert traces) and
   (b) the accepted distilled traces only; tested on held-out 2, 4, 6 and 8-step problems
   (greedy, strict).

`python experiments/distill.py [--quick] [--seeds 1] [--questions 2000] [--steps 1000]`
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict

from common import ensure_sft, experiment_args, output_dir, run_recipe, write_results

from thinkling.data.records import read_records
from thinkling.files import write_jsonl
from thinkling.tasks import get_task

TEST_K = [2, 4, 6, 8]
STUDENT = ["model.backend=tiny", "model.tiny={d_model: 64, n_layers: 2, n_heads: 4, max_seq_len: 224}",
           "sft.batch_size=64", "sft.lr=3.0e-3", "sft.warmup_steps=50", "sft.log_every=25"]


def add_args(p):
    p.add_argument("--questions", type=int, default=2000, help="chain questions (1-4 steps) to distill")
    p.add_argument("--tries", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--steps", type=int, default=None, help="student SFT steps (default 1000, quick 20)")
    p.add_argument("--first-seed", type=int, default=0)


def raw_records(n: int) -> list[dict]:
    """The N questions with their raw solutions: the chain task's own expert traces."""
    task = get_task("chain")
    return [{"id": p.id, "question": p.prompt, "answer": p.answer, "solution": task.target(p),
             "difficulty": p.difficulty} for p in task.problems(n, seed=0, difficulty=[1, 2, 3, 4])]


def main():
    args = experiment_args("distilled CoT vs raw solutions on chain", add_args)
    out = output_dir("distill", args.out, args.quick)
    n = 64 if args.quick else args.questions
    steps = args.steps or (20 if args.quick else 1000)
    teacher = ensure_sft("runs/experiments/quickstart-seeds/sft", "recipes/quickstart/sft.yaml",
                         ["sft.steps=100", "eval.size=8"] if args.quick else [])
    raw = raw_records(n)
    questions, raw_file, cot = out / "questions.jsonl", out / "raw.jsonl", out / "cot.jsonl"
    write_jsonl(questions, [{k: r[k] for k in ("id", "question", "answer", "difficulty")} for r in raw])
    write_jsonl(raw_file, raw)
    from thinkling.cli import main as cli

    command = ["distill", "--input", str(questions), "--teacher", str(teacher), "--task", "chain", "--option",
               "strict=true", "--tries", str(args.tries), "--temperature", str(args.temperature),
               "--max-new-tokens", "96", "--batch-size", "256", "--threads", "1", "--out", str(cot)]
    print("thinkling " + " ".join(command))
    cli(command)
    level = {r["id"]: r["difficulty"] for r in raw}
    tried = read_records(cot) + read_records(out / "cot.rejected.jsonl")
    by_k = defaultdict(list)
    for r in tried:
        by_k[level[r["id"]]].append(r["accepted"])
    accepted = read_records(cot)
    results = {"questions": n, "accepted": len(accepted), "acceptance": len(accepted) / len(tried),
               "tries_per_question": statistics.mean(r["tries"] for r in tried),
               "acceptance_by_k": {str(int(k)): statistics.mean(v) for k, v in sorted(by_k.items())},
               "steps": steps, "runs": {}}
    if (out / "results.json").exists():  # runs of earlier seeds stay in the table
        results["runs"] = json.loads((out / "results.json").read_text()).get("runs", {})
    evaluation = ["eval.name=chain", "eval.options={strict: true}", f"eval.difficulty={TEST_K}", "eval.seed=1",
                  f"eval.size={40 if args.quick else 200}", "eval.max_new_tokens=128", "eval.every=0"]
    for seed in range(args.first_seed, args.first_seed + (args.seeds or 1)):
        for name, data in (("raw", raw_file), ("distilled", cot)):
            summary = run_recipe("sft", None, [f"output_dir={out / f'{name}-s{seed}'}", f"seed={seed}",
                                               "train.name=jsonl", f"train.options={{path: {data}, verbatim: true}}",
                                               "train.size=null", f"sft.steps={steps}", *STUDENT, *evaluation])
            results["runs"][f"{name}/s{seed}"] = {
                "accuracy": summary["accuracy"], "mean_tokens": summary["mean_tokens"],
                "by_difficulty": {k: e["accuracy"] for k, e in summary["by_difficulty"].items()}}
    header = ["student trained on", "seed", "examples", *[f"k={k}" for k in TEST_K], "all", "tokens / solution"]
    rows = [[key.split("/")[0], key.split("/s")[1], n if key.startswith("raw") else len(accepted),
             *[f"{r['by_difficulty'][str(k)]:.3f}" for k in TEST_K], f"{r['accuracy']:.3f}", f"{r['mean_tokens']:.1f}"]
            for key, r in sorted(results["runs"].items())]
    for name in ("raw", "distilled"):  # mean over seeds
        runs = [r for key, r in results["runs"].items() if key.startswith(f"{name}/")]
        if len(runs) > 1:
            rows.append([name, "mean", rows[[row[0] for row in rows].index(name)][2],
                         *[f"{statistics.mean(r['by_difficulty'][str(k)] for r in runs):.3f}" for k in TEST_K],
                         f"{statistics.mean(r['accuracy'] for r in runs):.3f}",
                         f"{statistics.mean(r['mean_tokens'] for r in runs):.1f}"])
    accept = ", ".join(f"k={k}: {v:.3f}" for k, v in results["acceptance_by_k"].items())
    title = (f"chain: students on {n} raw solutions vs the {len(accepted)} distilled traces the teacher got "
             f"accepted (acceptance {results['acceptance']:.3f}; {accept}); {steps} SFT steps, held-out greedy strict")
    print(write_results(out, title, header, rows, results))


if __name__ == "__main__":
    main()
