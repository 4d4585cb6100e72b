"""What the paper-claim experiments share.

- `experiment_args`: `--quick`, `--seeds`, `--out`, `--jobs` for every script.
- `ensure_sft`: one shared SFT checkpoint per recipe, trained once and reused.
- `run_parallel`: at most two training processes at a time (the machine is shared).
- `sft_tagged`: SFT where prompts carry uninformative length tags (for TLDR runs).

Run the scripts from the repository root with the project venv, e.g.
`.venv/bin/python experiments/bread_vs_grpo.py --quick`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
if str(SRC) not in sys.path:  # the venv has the package installed; this only helps a bare checkout
    sys.path.insert(0, str(SRC))

from thinkling.errors import ThinklingError
from thinkling.eval.report import markdown_table
from thinkling.tasks.base import Problem, render_completion

RUNS = Path("runs/experiments")


def experiment_args(description: str, extra=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smoke version (about a minute)")
    parser.add_argument("--seeds", type=int, default=None, help="number of RL seeds (default: script's)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel training processes (max 2 on the shared box)")
    parser.add_argument("--out", default=None, help="output folder (default runs/experiments/<name>)")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    args.jobs = max(1, min(2, args.jobs))
    import torch

    torch.set_num_threads(1)
    return args


def output_dir(name: str, out: str | None, quick: bool) -> Path:
    path = Path(out) if out else RUNS / (f"{name}-quick" if quick else name)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(path: Path, title: str, header: list[str], rows: list[list], results: dict,
                  name: str = "results") -> str:
    table = f"## {title}\n\n{markdown_table(header, rows)}\n"
    (path / f"{name}.md").write_text(table)
    (path / f"{name}.json").write_text(json.dumps(results, indent=2))
    return table


def read_metrics(run: Path) -> list[dict]:
    f = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []


def eval_curve(run: Path, key: str = "eval/accuracy") -> list[dict]:
    """[{step, accuracy, tokens}] of the in-training evaluations (step 0 = the starting model);
    "accuracy" is the metric `key` (greedy accuracy, or e.g. "eval/pass@1")."""
    points = {}
    for r in read_metrics(run):
        if key in r:
            points[r["step"]] = {"step": r["step"], "accuracy": r[key], "tokens": r.get("total/generated_tokens", 0)}
    return [points[s] for s in sorted(points)]


def reach(curve: list[dict], target: float):
    """The first eval point of an `eval_curve` with accuracy >= target (None if never)."""
    for p in curve:
        if p["accuracy"] >= target - 1e-9:
            return p
    return None


def last_metric(run: Path, key: str):
    value = None
    for r in read_metrics(run):
        if key in r:
            value = r[key]
    return value


# --------------------------------------------------------------------------- jobs
def run_parallel(fn, jobs: list, workers: int) -> list:
    """`fn(job)` for every job, at most `workers` processes at once (fork keeps registered tasks)."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    import multiprocessing

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as ex:
        return list(ex.map(fn, jobs))


def run_recipe(kind: str, recipe: str | None, overrides: list[str], data: dict | None = None) -> dict:
    """`thinkling sft|rl|dpo RECIPE key=value...` in this process; skips a run whose eval.json exists."""
    import torch

    from thinkling import jobs
    from thinkling.config import RunConfig, apply_overrides, build, load_yaml

    torch.set_num_threads(1)
    base = load_yaml(recipe) if recipe else {}
    if data:
        from thinkling.pipeline import deep_merge

        base = deep_merge(base, data)
    cfg = build(RunConfig, apply_overrides(base, overrides))
    out = Path(cfg.output_dir)
    if (out / "eval.json").exists() and (out / "final" / "policy.json").exists():
        return json.loads((out / "eval.json").read_text())
    resume = out.exists() and any(out.iterdir())
    return {"sft": jobs.run_sft, "rl": jobs.run_rl, "dpo": jobs.run_dpo}[kind](cfg, resume=resume)


def run_rl_job(job: dict) -> dict:
    """`run_recipe(job.get("kind", "rl"), job["recipe"], job["overrides"])` for `run_parallel`; adds its wall time."""
    t0 = time.time()
    run_recipe(job.get("kind", "rl"), job["recipe"], job["overrides"])
    return {**job, "seconds": time.time() - t0}


def ensure_sft(output_dir: str | Path, recipe: str = "recipes/experiments/light-sft.yaml", overrides=()) -> Path:
    """The final policy of an SFT run, training it first if it is not there."""
    run_recipe("sft", recipe, [f"output_dir={output_dir}", *overrides])
    return Path(output_dir) / "final"


def minimal_tokens(problem: Problem) -> int:
    """Characters (= tokens) of the shortest correct completion: steps + answer line + eos."""
    return len(render_completion(problem.steps, problem.answer)) + 1


def sft_tagged(output: Path, task_name: str, task_options: dict, difficulty, *, steps: int, size: int = 20000,
               tag_prob: float = 0.75, seed: int = 0, model: dict | None = None, lr: float = 3e-3,
               styles: dict[str, dict] | None = None, styles_follow_tag: bool = True) -> Path:
    """SFT a fresh tiny model where a fraction `tag_prob` of prompts carry a random length tag
    ([short]/[medium]/[long]), so a later TLDR run does not start from a model that has never seen
    a tag. Without `styles` the tags are uninformative. `styles` maps each level to task options
    of its own (e.g. `{"short": {"merge": 1.0}, ...}`): a tagged prompt's target is then a trace in
    its level's style (the model learns to obey the tag); untagged prompts keep `task_options`.
    With `styles_follow_tag=False` every example (tagged or not) gets one of the styles at random,
    independent of its tag: the model writes every style but the tags say nothing. Saves `output/final` and `output/sft.json`."""
    import torch

    from thinkling.config import SFTConfig
    from thinkling.models.tiny import TinyPolicy
    from thinkling.rollout.prompts import LENGTH_LEVELS, prompt_ids
    from thinkling.tasks import get_task
    from thinkling.train.sft import make_example, train_sft

    final = Path(output) / "final"
    if (final / "policy.json").exists():
        return final
    torch.set_num_threads(1)
    task = get_task(task_name, **task_options)
    problems = task.problems(size, seed, difficulty)
    policy = TinyPolicy.create(model or {"d_model": 96, "n_layers": 3, "n_heads": 4, "max_seq_len": 192}, seed=seed)
    pools = {None: problems}
    if styles is not None:
        if set(styles) != set(LENGTH_LEVELS):
            fail(f"sft_tagged: styles needs exactly the levels {', '.join(LENGTH_LEVELS)}, got {', '.join(styles)}")
        for i, level in enumerate(LENGTH_LEVELS):  # one problem set per style (other seeds: other problems)
            pools[level] = get_task(task_name, **{**task_options, **styles[level]}).problems(size, seed + 1 + i, difficulty)
    rng, style_rng = random.Random(seed + 99), random.Random(seed + 98)
    examples = []
    for i in range(size):
        level = rng.choice(LENGTH_LEVELS) if rng.random() < tag_prob else None
        style = None if styles is None else level if styles_follow_tag else style_rng.choice(LENGTH_LEVELS)
        p = pools[style][i]
        examples.append(make_example(policy, prompt_ids(policy, p, level), task.target(p)))
    cfg = SFTConfig(steps=steps, batch_size=64, lr=lr, warmup_steps=50)
    losses = []
    train_sft(policy, examples, cfg, seed=seed, progress=lambda step, loss: losses.append(loss))
    policy.save(str(final))
    (Path(output) / "sft.json").write_text(json.dumps({"task": task_name, "options": task_options,
                                                        "difficulty": difficulty, "steps": steps, "size": size,
                                                        "tag_prob": tag_prob, "styles": styles,
                                                        "styles_follow_tag": styles_follow_tag,
                                                        "final_loss": sum(losses[-25:]) / max(1, len(losses[-25:]))}))
    return final


def fail(msg: str):
    raise ThinklingError(msg)


# ------------------------------------------------------------ shared verbose SFT model
VERBOSE_TRAIN_K = [1, 2, 3, 4]
VERBOSE_EVAL_K = [2, 3, 4]


def verbose_sft(quick: bool, checks: str = "suffix") -> Path:
    """The SFT model on verbose chain traces (k = 1..4, random length tags on 75 % of prompts),
    shared by stop_sweep.py and tldr.py."""
    name = "sft-chain-verbose" + ("" if checks == "suffix" else f"-{checks}") + ("-quick" if quick else "")
    options = {} if checks == "suffix" else {"checks": checks}
    return sft_tagged(RUNS / name, "chain_verbose", options, VERBOSE_TRAIN_K, steps=150 if quick else 1000)


def evaluate_model(policy, task, problems, *, max_new_tokens: int, samples: int = 1, ts_alpha: float = 1.0,
                   budget: int | None = None, level: str | None = None, seed: int = 0, processor=None) -> dict:
    """thinkling's evaluation (greedy + `samples` sampled completions at T=1) without the progress bar."""
    from thinkling.config import EvalConfig
    from thinkling.eval.evaluate import evaluate
    from thinkling.rollout.stopping import make_stop_processor

    cfg = EvalConfig(max_new_tokens=max_new_tokens, samples=samples, temperature=1.0, batch_size=256,
                     ts_alpha=ts_alpha, budget=budget)
    summary, rows = evaluate(policy, task, problems, cfg, seed=seed, level=level,
                             stop_processor=processor or make_stop_processor(policy, task, ts_alpha=ts_alpha, budget=budget))
    greedy = [r for r in rows if r["mode"] == "greedy"]
    sampled = [r for r in rows if r["mode"] != "greedy"]
    summary["check_lines_greedy"] = sum(r["completion"].count("check") for r in greedy) / len(greedy)
    if sampled:
        summary["check_lines_sampled"] = sum(r["completion"].count("check") for r in sampled) / len(sampled)
    summary["minimal_tokens"] = sum(minimal_tokens(p) for p in problems) / len(problems)
    return summary


def eval_levels(path: Path, problems, task, *, samples: int, max_new_tokens: int,
                levels=("short", "medium", "long", None)) -> dict:
    """The saved policy at `path` evaluated once per TLDR length level (None = untagged prompt)."""
    from thinkling.models import load_policy

    policy = load_policy(path)
    out = {}
    for level in levels:
        s = evaluate_model(policy, task, problems, max_new_tokens=max_new_tokens, samples=samples, level=level)
        out[level or "none"] = {"acc_greedy": s["accuracy"], "tokens_greedy": s["mean_tokens"],
                                "acc_sampled": s.get("pass@1"), "tokens_sampled": s.get("mean_tokens_sampled"),
                                "checks_greedy": s["check_lines_greedy"], "checks_sampled": s.get("check_lines_sampled"),
                                "minimal_tokens": s["minimal_tokens"], "by_difficulty": s["by_difficulty"]}
    return out
