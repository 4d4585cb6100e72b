"""The jobs behind the CLI verbs: each builds its run folder, trains or evaluates, and reports."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from thinkling.errors import ThinklingError
from thinkling.models import build_policy, configure_policy, load_policy
from thinkling.progress import bar, console
from thinkling.runs import RunDir, atomic_write_text
from thinkling.tasks.base import get_task
from thinkling.train.common import load_optimizer_state, make_optimizer, seed_everything


def problems_for(task_cfg, what: str):
    task = get_task(task_cfg.name, **task_cfg.options)
    problems = task.generate(task_cfg.size, task_cfg.seed, task_cfg.difficulty)
    if not problems:
        raise ThinklingError(f"config section '{what}': task '{task_cfg.name}' produced no problems")
    return task, problems


def stop_processor(policy, task, ts_alpha: float, budget: int | None):
    """The logits processor for temperature-scaled stopping and/or budget forcing (None if neither)."""
    from thinkling.rollout.stopping import make_stop_processor

    return make_stop_processor(policy, task, ts_alpha=ts_alpha, budget=budget)


def evaluate_policy(policy, task, problems, eval_cfg, seed=0, level=None, description="eval", log=None):
    from thinkling.eval.evaluate import evaluate

    total = len(problems) * (1 + (eval_cfg.samples if eval_cfg.samples > 1 else 0))
    with bar(description, total) as advance:
        return evaluate(policy, task, problems, eval_cfg, seed=seed, level=level, progress=advance, log=log,
                        stop_processor=stop_processor(policy, task, eval_cfg.ts_alpha, eval_cfg.budget))


def configure_threads(cfg) -> None:
    """Tiny models run fastest on one thread: more threads cost sync overhead, and under any
    other load on the machine they are many times slower."""
    import torch

    threads = cfg.threads if cfg.threads is not None else (1 if _is_tiny(cfg.model) else None)
    if threads is not None:
        if threads < 1:
            raise ThinklingError(f"config key 'threads' must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _is_tiny(model_cfg) -> bool:
    """A fresh tiny model, or a saved tiny policy (a policy folder or a run folder's final/)."""
    if not model_cfg.init:
        return model_cfg.backend == "tiny"
    path = Path(model_cfg.init)
    meta = next((m for m in (path / "policy.json", path / "final" / "policy.json") if m.exists()), None)
    return meta is not None and json.loads(meta.read_text()).get("backend") == "tiny"


def _resume_policy(run: RunDir, cfg, resume: bool):
    """The policy and the step to continue from (0 and a fresh policy for a new run)."""
    ckpt = run.latest_checkpoint() if resume else None
    if ckpt is None:
        return build_policy(cfg.model, cfg.seed), None, 0
    state = run.load_state(ckpt)
    run.truncate_metrics(state["step"])
    console.print(f"resuming {run.path} from {ckpt.name}")
    return configure_policy(load_policy(ckpt / "policy"), cfg.model), ckpt, state["step"]


# --------------------------------------------------------------------- SFT
def run_sft(cfg, resume: bool = False) -> dict:
    """SFT in one process, or data-parallel under torchrun / accelerate launch (`train.distributed`):
    every process trains the same steps; process 0 alone writes the run folder, evaluates and
    reports, the others only read it (to resume from its checkpoint) and return {"rank": r}."""
    from thinkling.train.distributed import DataParallel
    from thinkling.train.sft import sft_examples, train_sft

    validate_sft(cfg)
    configure_threads(cfg)
    seed_everything(cfg.seed)
    train_task, train_problems = problems_for(cfg.train, "train")
    eval_task, eval_problems = problems_for(cfg.eval, "eval")
    dp = DataParallel.from_env()
    if not dp.is_main:
        console.quiet = True  # one voice: process 0 reports for the run
    run = dp.run_dir(cfg.output_dir, cfg, resume=resume)
    policy, ckpt, start = _resume_policy(run, cfg, resume)
    examples = sft_examples(policy, train_task, train_problems)
    optimizer = make_optimizer(policy.model, cfg.sft.lr, cfg.sft.weight_decay)
    if ckpt is not None:
        load_optimizer_state(optimizer, ckpt / "optimizer.pt")

    def on_eval(step):
        summary, _ = evaluate_policy(policy, eval_task, eval_problems, cfg.evaluation, cfg.seed, description=f"eval@{step}")
        run.log(step, eval_metrics(summary))

    n_params = sum(p.numel() for p in policy.model.parameters())
    console.print(f"SFT: {n_params / 1e6:.2f} M parameters, {len(examples)} examples, {cfg.sft.steps} steps -> {run.path}")
    with bar("sft", cfg.sft.steps - start) as advance:
        train_sft(policy, examples, cfg.sft, seed=cfg.seed, run=run, start_step=start, optimizer=optimizer,
                  on_eval=on_eval, eval_every=cfg.evaluation.every, data_parallel=dp,
                  progress=lambda step, loss: advance(1, info=f"loss {loss:.3f}"))
    if not dp.is_main:
        return {"rank": dp.rank}
    return finish(run, policy, eval_task, eval_problems, cfg, step=cfg.sft.steps)


def validate_sft(cfg) -> None:
    s = cfg.sft
    for key in ("steps", "batch_size", "log_every", "save_every"):
        if getattr(s, key) < 1:
            raise ThinklingError(f"config key 'sft.{key}' must be >= 1, got {getattr(s, key)}")
    if s.lr <= 0:
        raise ThinklingError(f"config key 'sft.lr' must be > 0, got {s.lr}")
    if s.micro_batch_size is not None and s.micro_batch_size < 1:
        raise ThinklingError(f"config key 'sft.micro_batch_size' must be >= 1, got {s.micro_batch_size}")


def finish(run: RunDir, policy, eval_task, eval_problems, cfg, step: int, extra: dict | None = None) -> dict:
    """Save the final policy, evaluate it, write eval.json + samples, print the table."""
    final = run.path / "final"
    tmp = run.path / ".final_tmp"
    policy.save(str(tmp))
    if final.exists():
        import shutil

        shutil.rmtree(final)
    tmp.rename(final)
    summary, rows = evaluate_policy(policy, eval_task, eval_problems, cfg.evaluation, cfg.seed, description="final eval")
    run.log(step, {**eval_metrics(summary), **(extra or {})})
    atomic_write_text(run.path / "eval.json", json.dumps(summary, indent=2))
    run.write_samples(step, rows[:200])
    run.close()
    print_summary(summary, title=f"{run.path} — {eval_task.name} ({len(eval_problems)} problems)")
    return summary


def eval_metrics(summary: dict) -> dict:
    """What a run logs of an evaluation: greedy accuracy and tokens, plus sampled pass@1 when
    `evaluation.samples` > 0 (what RL at temperature 1 optimises; greedy can hide it)."""
    out = {"eval/accuracy": summary["accuracy"], "eval/mean_tokens": summary["mean_tokens"]}
    if "pass@1" in summary:
        out["eval/pass@1"] = summary["pass@1"]
    return out


def print_summary(summary: dict, title: str) -> None:
    table = Table(title=title)
    passes = [k for k in next(iter(summary["by_difficulty"].values()), {}) if k.startswith("pass@")]
    for col in ("difficulty", "n", "accuracy", "strict accuracy", "mean tokens", *passes):
        table.add_column(col, justify="right")
    for d, e in summary["by_difficulty"].items():
        table.add_row(d, str(e["n"]), f"{e['accuracy']:.3f}", f"{e['strict_accuracy']:.3f}",
                      f"{e['mean_tokens']:.1f}", *[f"{e[k]:.3f}" for k in passes])
    extra = [f"{summary[k]:.3f}" for k in passes]
    table.add_row("all", str(summary["n"]), f"{summary['accuracy']:.3f}", f"{summary['strict_accuracy']:.3f}",
                  f"{summary['mean_tokens']:.1f}", *extra)
    console.print(table)


# -------------------------------------------------------------------- eval
def run_eval(model: str, task_cfg, eval_cfg, out: str | None, seed: int = 0, level: str | None = None,
             dtype: str | None = None, threads: int | None = None) -> dict:
    """Evaluate a saved policy / model alias on a task.

    With `out`, the summary goes to `out` (JSON) and every completion to `out`'s `.jsonl`
    as it is produced; rerunning the same command continues an interrupted evaluation.
    `dtype` loads an alias / hub id in float32 or bfloat16; `threads` sets torch's CPU threads.
    """
    from thinkling.eval.evaluate import RowLog

    task, problems = problems_for(task_cfg, "eval")
    log = None
    if out:
        out_path = Path(out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        log = RowLog(out_path.with_suffix(".jsonl"))
        if log.rows:
            console.print(f"continuing: {len(log.rows)} completions already in {log.path}")
    configure_eval_threads(model, threads)
    policy = policy_for_eval(model, dtype)
    try:
        summary, _ = evaluate_policy(policy, task, problems, eval_cfg, seed, level=level, log=log)
    except KeyboardInterrupt:  # the CLI prints this one line instead of a traceback
        saved = (f"{len(log.rows)} generations saved to {log.path}; rerun the same command to continue" if log
                 else "nothing saved (--out FILE keeps every generation)")
        raise KeyboardInterrupt(f"interrupted: {saved}") from None
    if out:
        atomic_write_text(out_path, json.dumps(summary, indent=2))
    print_summary(summary, title=f"{model} — {task.name} ({len(problems)} problems)")
    return summary


def policy_for_eval(model: str, dtype: str | None = None):
    """A saved policy / run folder, or an alias / hub id loaded as an HF model in `dtype`."""
    from thinkling.config import ModelConfig

    if Path(model).exists():
        if dtype is not None:
            raise ThinklingError("--dtype applies to model aliases and hub ids; a saved policy keeps its own")
        return load_policy(model)
    return build_policy(ModelConfig(backend="hf", name=model, dtype=dtype or "float32"), seed=0)


def configure_eval_threads(model: str, threads: int | None) -> None:
    """`configure_threads` for an eval: one thread for a saved tiny policy unless `threads` says otherwise."""
    from thinkling.config import ModelConfig, RunConfig

    init = model if Path(model).exists() else None
    configure_threads(RunConfig(threads=threads, model=ModelConfig(backend="hf", init=init)))


def run_stop_sweep(model: str, task_cfg, alphas, budgets, out: str, max_new_tokens: int, *, samples: int = 1,
                   temperature: float = 1.0, batch_size: int = 64, seed: int = 0, dtype: str | None = None,
                   threads: int | None = None, budget_marker: str | None = None) -> dict:
    """`thinkling sweep-stop`: accuracy vs tokens for TS at each α and budget forcing at each B
    (`eval.sweep.stop_sweep`), written to `out`/sweep.json + sweep.png and printed as a table.
    As in `eval`, `samples` > 1 adds sampled completions at `temperature` (pass@1)."""
    from thinkling.eval.sweep import stop_sweep

    configure_eval_threads(model, threads)
    try:
        table = stop_sweep(model, task_cfg, alphas, budgets, out, max_new_tokens, batch_size=batch_size, seed=seed,
                           dtype=dtype, budget_marker=budget_marker, samples=samples,
                           temperature=temperature if samples > 1 else 0.0)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted: finished generations are kept in {out}; "
                                "rerun the same command to continue") from None
    sampled = samples > 1
    grid = Table(title=f"{model} — {task_cfg.name} ({table['n']} problems, {table['decoding']}) -> {out}/sweep.png")
    for col in ("method", "setting", "pass@1" if sampled else "accuracy", "mean tokens", "format rate (greedy)"):
        grid.add_column(col, justify="right")
    for r in table["rows"]:
        setting = f"{'α' if r['method'] == 'ts' else 'B'}={r['value']:g}"
        grid.add_row(r["method"], setting, f"{r['accuracy']:.3f}", f"{r['mean_tokens']:.1f}",
                     f"{r['greedy_format_rate']:.3f}")
    console.print(grid)
    return table


# ---------------------------------------------------------------------- RL
def run_rl(cfg, resume: bool = False) -> dict:
    from thinkling.train.rl import RLTrainer, validate_rl

    configure_threads(cfg)
    seed_everything(cfg.seed)
    task, problems = problems_for(cfg.train, "train")
    eval_task, eval_problems = problems_for(cfg.eval, "eval")
    knobs = validate_rl(cfg, problems)
    run = RunDir(cfg.output_dir, cfg, resume=resume)
    policy, ckpt, start = _resume_policy(run, cfg, resume)
    optimizer = make_optimizer(policy.model, cfg.rl.lr, cfg.rl.weight_decay)
    trainer = RLTrainer(policy, task, problems, cfg.rl, knobs, optimizer, seed=cfg.seed)
    if ckpt is not None:
        load_optimizer_state(optimizer, ckpt / "optimizer.pt")
        trainer.load_state(run.load_state(ckpt))
    policy.model.eval()

    def evaluate_now(step):
        summary, _ = evaluate_policy(policy, eval_task, eval_problems, cfg.evaluation, cfg.seed, description=f"eval@{step}")
        run.log(step, {**eval_metrics(summary), "total/generated_tokens": trainer.totals["generated_tokens"]})

    bread = " + BREAD" if cfg.rl.bread.enabled else ""
    console.print(f"RL ({cfg.rl.algorithm}{bread}): {cfg.rl.steps} steps × {cfg.rl.prompts_per_step} prompts × G={cfg.rl.group_size} -> {run.path}")
    if start == 0 and cfg.evaluation.every:
        evaluate_now(0)
    with bar("rl", cfg.rl.steps - start) as advance:
        for step in range(start, cfg.rl.steps):
            metrics, groups = trainer.step(step, cfg.rl.steps)
            done = step + 1
            if done % cfg.rl.log_every == 0 or done == cfg.rl.steps:
                run.log(done, metrics)
            if cfg.rl.samples_every and done % cfg.rl.samples_every == 0:
                run.write_samples(done, [{"id": g.problem.id, "anchor_steps": g.anchor_steps, "reward": r,
                                          "correct": c.correct, "completion": c.text}
                                         for g in groups[:4] for c, r in zip(g.completions, g.rewards)])
            if cfg.evaluation.every and done % cfg.evaluation.every == 0 and done != cfg.rl.steps:
                evaluate_now(done)
            if done % cfg.rl.save_every == 0 or done == cfg.rl.steps:
                run.save_checkpoint(done, policy, optimizer, trainer.state())
            advance(1, info=f"reward {metrics.get('reward_mean', 0):.2f} acc {metrics.get('accuracy', 0):.2f}")
    return finish(run, policy, eval_task, eval_problems, cfg, step=cfg.rl.steps,
                  extra={"total/generated_tokens": trainer.totals["generated_tokens"]})
