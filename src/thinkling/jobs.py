"""The jobs behind the CLI verbs: each validates its recipe, builds its run folder, trains or
evaluates, and reports."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from rich.table import Table

from thinkling.config import ModelConfig
from thinkling.data.curriculum import make_sampler
from thinkling.errors import ThinklingError
from thinkling.eval.evaluate import RowLog, eval_metrics, evaluate_policy, print_summary
from thinkling.eval.report import eval_report, write_report
from thinkling.eval.sweep import stop_sweep
from thinkling.files import atomic_write_text, read_json
from thinkling.models import build_policy, configure_policy, load_policy, open_policy
from thinkling.models.vllm_server import ServerClient
from thinkling.progress import bar, console
from thinkling.rollout.prompts import check_fits
from thinkling.runs import RunDir
from thinkling.tasks import problem_set
from thinkling.train.common import load_optimizer_state, make_optimizer, seed_everything
from thinkling.train.distributed import DataParallel
from thinkling.train.dpo import rounds as dpo_rounds
from thinkling.train.dpo import train_dpo, validate_dpo
from thinkling.train.rl import train_rl, validate_rl
from thinkling.train.sft import build_memory, check_examples_fit, sft_examples, train_sft
from thinkling.train.sharding import full_state, gathered, shard_policy


def configure_threads(threads: int | None, model_cfg) -> None:
    """Tiny models run fastest on one thread: more threads cost sync overhead, and under any
    other load on the machine they are many times slower."""
    threads = threads if threads is not None else (1 if _is_tiny(model_cfg) else None)
    if threads is not None:
        if threads < 1:
            raise ThinklingError(f"config key 'threads' must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _is_tiny(model_cfg) -> bool:
    """A fresh tiny model, or a saved tiny policy (a policy folder or a run folder's final/)."""
    if not model_cfg.init:
        return model_cfg.backend in ("tiny", "tiny_vlm")
    path = Path(model_cfg.init)
    meta = next((m for m in (path / "policy.json", path / "final" / "policy.json") if m.exists()), None)
    return meta is not None and read_json(meta).get("backend") in ("tiny", "tiny_vlm")


def check_world(dp: DataParallel, batch: int, key: str, unit: str) -> None:
    """Every process needs a share of each step's batch. Checked before the run folder opens, so a
    launch (or a resume) with more processes than that is one error line and writes nothing."""
    if dp.world_size > batch:
        raise ThinklingError(f"config key '{key}': {batch} {unit}s per step cannot be shared by the "
                             f"{dp.world_size} processes launched (WORLD_SIZE); launch at most {batch}")


def _open_run(cfg, resume: bool, make_run, prepare):
    """The run folder, the policy, the checkpoint, the step to continue from and `prepare(policy)`.

    A new run builds its policy and runs `prepare` (which checks the data against it) before
    `make_run()` creates its folder, so a bad `model.init` or a problem too long for the model
    writes nothing. A resumed run keeps the metric rows logged before its checkpoint (all of
    them, none twice); without a checkpoint it starts over.
    """
    if not resume:
        policy = build_policy(cfg.model, cfg.seed)
        prepared = prepare(policy)
        return make_run(), policy, prepared, None, 0
    run = make_run()
    ckpt = run.latest_checkpoint()
    if ckpt is None:
        run.truncate_metrics(0)
        policy = build_policy(cfg.model, cfg.seed)
        return run, policy, prepare(policy), None, 0
    state = run.load_state(ckpt)
    rows = state.get("metrics_rows", sum(1 for r in run.metrics() if r["step"] <= state["step"]))
    run.truncate_metrics(rows)
    console.print(f"resuming {run.path} from {ckpt.name}")
    policy = configure_policy(load_policy(ckpt / "policy", cfg.model.trust_remote_code), cfg.model)
    return run, policy, prepare(policy), ckpt, state["step"]


def _evaluator(policy, task, problems, cfg):
    """`evaluate(step) -> metrics` for the trainers' periodic held-out evaluation."""
    def evaluate(step: int) -> dict:
        summary, _ = evaluate_policy(policy, task, problems, cfg.eval, cfg.seed, description=f"eval@{step}")
        return eval_metrics(summary)

    return evaluate


def check_recipe(cfg, kind: str, init_from_earlier_stage: bool = False) -> None:
    """What a run checks before any work (its problem sets, RL knobs and rewards, a saved
    model.init), so a pipeline can check every stage before its first one starts."""
    _, train_problems = problem_set(cfg.train, "train")
    problem_set(cfg.eval, "eval")
    if kind == "rl":
        validate_rl(cfg, train_problems, warn=False)
    if kind == "dpo":
        validate_dpo(cfg.dpo)
    steps = {"rl": cfg.rl.steps, "sft": cfg.sft.steps, "dpo": dpo_rounds(cfg.dpo)}[kind]
    make_sampler(cfg.curriculum, train_problems, steps, kind)
    init = cfg.model.init
    if init and not init_from_earlier_stage and not any((Path(init) / f).exists() for f in ("policy.json", "final")):
        raise ThinklingError(f"config key 'model.init': {init} is not a saved policy or run folder")


# --------------------------------------------------------------------- SFT
def run_sft(cfg, resume: bool = False) -> dict:
    """SFT in one process, or data-parallel under torchrun / accelerate launch (`train.distributed`):
    every process trains the same steps; process 0 alone writes the run folder, evaluates and
    reports, the others only read it (to resume from its checkpoint) and return {"rank": r}."""
    configure_threads(cfg.threads, cfg.model)
    seed_everything(cfg.seed)
    train_task, train_problems = problem_set(cfg.train, "train")
    eval_task, eval_problems = problem_set(cfg.eval, "eval")
    sampler = make_sampler(cfg.curriculum, train_problems, cfg.sft.steps, "sft")
    dp = DataParallel.from_env()
    if not dp.is_main:
        console.quiet = True  # one voice: process 0 reports for the run
    check_world(dp, cfg.sft.batch_size, "sft.batch_size", "example")

    def prepare(policy):
        build_memory(policy, train_task, train_problems)  # TinyAlign: a new run's bank (a resumed one has its own)
        check_fits(policy, eval_problems, cfg.eval.max_new_tokens, "eval")
        return check_examples_fit(policy, sft_examples(policy, train_task, train_problems), train_problems)

    run, policy, examples, ckpt, start = _open_run(cfg, resume, lambda: dp.run_dir(cfg.output_dir, cfg, resume=resume),
                                                   prepare)
    if cfg.model.fsdp:
        shard_policy(policy, dp)
    optimizer = make_optimizer(policy.model, cfg.sft.lr, cfg.sft.weight_decay)
    if ckpt is not None:
        load_optimizer_state(optimizer, ckpt / "optimizer.pt", policy.model)
    n_params = sum(p.numel() for p in policy.model.parameters())
    console.print(f"SFT: {n_params / 1e6:.2f} M parameters, {len(examples)} examples, {cfg.sft.steps} steps -> {run.path}")
    with bar("sft", cfg.sft.steps - start) as advance:
        train_sft(policy, examples, cfg.sft, seed=cfg.seed, run=run, start_step=start, optimizer=optimizer,
                  evaluate=_evaluator(policy, eval_task, eval_problems, cfg), eval_every=cfg.eval.every,
                  data_parallel=dp, sampler=sampler, progress=lambda step, loss: advance(1, info=f"loss {loss:.3f}"))
    with full_state(policy), gathered(policy):  # a sharded policy: saved and evaluated whole, by process 0
        if not dp.is_main:
            return {"rank": dp.rank}
        return finish(run, policy, eval_task, eval_problems, cfg, step=cfg.sft.steps)


# ---------------------------------------------------------------------- RL
def run_rl(cfg, resume: bool = False) -> dict:
    """RL in one process, or data-parallel under torchrun / accelerate launch (`train.distributed`),
    as `run_sft`: process 0 alone writes the run folder, evaluates and reports; the others return
    {"rank": r}. A run may be resumed with any number of processes."""
    configure_threads(cfg.threads, cfg.model)
    seed_everything(cfg.seed)
    task, problems = problem_set(cfg.train, "train")
    eval_task, eval_problems = problem_set(cfg.eval, "eval")
    dp = DataParallel.from_env()
    if not dp.is_main:
        console.quiet = True  # one voice: process 0 reports for the run
    check_world(dp, cfg.rl.prompts_per_step, "rl.prompts_per_step", "prompt")
    knobs = validate_rl(cfg, problems, warn=dp.is_main)
    sampler = make_sampler(cfg.curriculum, problems, cfg.rl.steps)

    def prepare(policy):
        build_memory(policy, task, problems)  # TinyAlign straight from a fresh model: RL's pairs make the bank
        check_fits(policy, problems, cfg.rl.max_new_tokens, "train")
        check_fits(policy, eval_problems, cfg.eval.max_new_tokens, "eval")

    client = None
    if cfg.rl.rollout_backend == "vllm-server":
        client = ServerClient(cfg.rl.vllm_url)
        client.health()  # before the run folder: a wrong URL writes nothing
    run, policy, _, ckpt, start = _open_run(cfg, resume, lambda: dp.run_dir(cfg.output_dir, cfg, resume=resume), prepare)
    if cfg.model.fsdp:
        shard_policy(policy, dp)
    optimizer = make_optimizer(policy.model, cfg.rl.lr, cfg.rl.weight_decay)
    if ckpt is not None:
        load_optimizer_state(optimizer, ckpt / "optimizer.pt", policy.model)
    bread = " + BREAD" if cfg.rl.bread.enabled else ""
    console.print(f"RL ({cfg.rl.algorithm}{bread}): {cfg.rl.steps} steps × {cfg.rl.prompts_per_step} prompts "
                  f"× G={cfg.rl.group_size} -> {run.path}")
    reference = starting_policy(cfg) if knobs.beta > 0 or cfg.rl.kl_to_start else None
    with bar("rl", cfg.rl.steps - start) as advance:
        trainer = train_rl(
            policy, task, problems, cfg.rl, knobs, seed=cfg.seed, run=run, start_step=start, optimizer=optimizer,
            reference=reference, sampler=sampler, rollout_client=client,
            state=run.load_state(ckpt) if ckpt is not None else None,
            evaluate=_evaluator(policy, eval_task, eval_problems, cfg), eval_every=cfg.eval.every, data_parallel=dp,
            progress=lambda step, m: advance(1, info=f"reward {m.get('reward_mean', 0):.2f} acc {m.get('accuracy', 0):.2f}"))
    with full_state(policy), gathered(policy):  # a sharded policy: saved and evaluated whole, by process 0
        if not dp.is_main:
            return {"rank": dp.rank}
        return finish(run, policy, eval_task, eval_problems, cfg, step=cfg.rl.steps,
                      extra={"total/generated_tokens": trainer.totals["generated_tokens"]})


def starting_policy(cfg):
    """The run's starting policy, rebuilt from the recipe (a resumed run's policy is a checkpoint, not
    the start): RL's KL anchor and DPO's reference. It only scores, never samples."""
    start_model = dataclasses.replace(cfg.model, generator="engine", rollout_dtype=None, gradient_checkpointing=False)
    return build_policy(start_model, cfg.seed)


# --------------------------------------------------------------------- DPO
def run_dpo(cfg, resume: bool = False) -> dict:
    """Rollout DPO (`train.dpo`) in one process, with the run folder, evaluation and report of an RL run."""
    configure_threads(cfg.threads, cfg.model)
    seed_everything(cfg.seed)
    if DataParallel.from_env().enabled:
        raise ThinklingError("thinkling dpo runs in one process; launch it without torchrun / accelerate")
    task, problems = problem_set(cfg.train, "train")
    eval_task, eval_problems = problem_set(cfg.eval, "eval")
    validate_dpo(cfg.dpo)
    sampler = make_sampler(cfg.curriculum, problems, dpo_rounds(cfg.dpo), "dpo")

    def prepare(policy):
        check_fits(policy, problems, cfg.dpo.max_new_tokens, "train")
        check_fits(policy, eval_problems, cfg.eval.max_new_tokens, "eval")

    run, policy, _, ckpt, start = _open_run(cfg, resume, lambda: RunDir(cfg.output_dir, cfg, resume=resume), prepare)
    optimizer = make_optimizer(policy.model, cfg.dpo.lr, cfg.dpo.weight_decay)
    if ckpt is not None:
        load_optimizer_state(optimizer, ckpt / "optimizer.pt")
    d = cfg.dpo
    console.print(f"DPO ({d.loss}, beta={d.beta}): {d.steps} steps, a round of {d.prompts_per_round} prompts "
                  f"× G={d.group_size} every {d.refresh_every} -> {run.path}")
    with bar("dpo", d.steps - start) as advance:
        trainer = train_dpo(
            policy, starting_policy(cfg), task, problems, d, seed=cfg.seed, run=run, start_step=start,
            optimizer=optimizer, sampler=sampler, state=run.load_state(ckpt) if ckpt is not None else None,
            evaluate=_evaluator(policy, eval_task, eval_problems, cfg), eval_every=cfg.eval.every,
            progress=lambda step, m: advance(1, info=f"pairs {m.get('pairs', 0)} margin {m.get('rewards/margins', 0):.2f}"))
    return finish(run, policy, eval_task, eval_problems, cfg, step=d.steps,
                  extra={"total/generated_tokens": trainer.totals["generated_tokens"]})


def finish(run: RunDir, policy, eval_task, eval_problems, cfg, step: int, extra: dict | None = None) -> dict:
    """Save the final policy, evaluate it, write eval.json + samples, print the table."""
    final = run.path / "final"
    tmp = run.path / ".final_tmp"
    policy.save(str(tmp))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    summary, rows = evaluate_policy(policy, eval_task, eval_problems, cfg.eval, cfg.seed, description="final eval")
    run.log(step, {**eval_metrics(summary), **(extra or {})})
    atomic_write_text(run.path / "eval.json", json.dumps(summary, indent=2))
    run.write_samples(step, rows[:200])
    run.close()
    title = f"{run.path} — {eval_task.name} ({len(eval_problems)} problems)"
    report = write_report({run.path.name: run.path}, run.path, title=title)
    print_summary(summary, title=title)
    console.print(f"report: {report}")
    return summary


# -------------------------------------------------------------------- eval
def run_eval(model: str, eval_cfg, out: str | None, seed: int = 0, level: str | None = None,
             dtype: str | None = None, threads: int | None = None, trust_remote_code: bool = False) -> dict:
    """Evaluate a saved policy / model alias on the problems `eval_cfg` (an EvalConfig) names.

    With `out`, the summary goes to `out` (JSON) and every completion to `out`'s `.jsonl`
    as it is produced; rerunning the same command continues an interrupted evaluation.
    `dtype` loads an alias / hub id in float32 or bfloat16; `threads` sets torch's CPU threads.
    """
    task, problems = problem_set(eval_cfg, "eval")
    out_path = Path(out) if out else None
    if out_path is not None and out_path.is_dir():
        raise ThinklingError(f"--out {out}: is a folder; name the summary file, e.g. {out_path / 'eval.json'}")
    configure_eval_threads(model, threads)
    policy = open_policy(model, dtype, trust_remote_code)
    check_fits(policy, problems, eval_cfg.max_new_tokens, "eval")
    log = None
    if out_path is not None:
        try:
            out_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ThinklingError(f"--out {out}: cannot create its folder ({e.strerror})") from None
        settings = {"model": model, "dtype": dtype, "seed": seed, "level": level, **dataclasses.asdict(eval_cfg)}
        settings.pop("batch_size")  # how many at a time does not change a completion
        settings.pop("every")
        log = RowLog(out_path.with_suffix(".jsonl"), settings)
        if log.rows:
            console.print(f"continuing: {len(log.rows)} completions already in {log.path}")
    try:
        summary, _ = evaluate_policy(policy, task, problems, eval_cfg, seed, level=level, log=log)
    except KeyboardInterrupt:  # the CLI prints this one line instead of a traceback
        saved = (f"{len(log.rows)} generations saved to {log.path}; rerun the same command to continue" if log
                 else "nothing saved (--out FILE keeps every generation)")
        raise KeyboardInterrupt(f"interrupted: {saved}") from None
    title = f"{model} — {task.name} ({len(problems)} problems)"
    if out:
        atomic_write_text(out_path, json.dumps(summary, indent=2))
        atomic_write_text(out_path.with_suffix(".md"), eval_report(summary, title))
    print_summary(summary, title=title)
    return summary


def configure_eval_threads(model: str, threads: int | None) -> None:
    """`configure_threads` for an eval: one thread for a saved tiny policy unless `threads` says otherwise."""
    init = model if Path(model).exists() else None
    configure_threads(threads, ModelConfig(backend="hf", init=init))


def run_stop_sweep(model: str, task_cfg, alphas, budgets, out: str, max_new_tokens: int, *, samples: int = 1,
                   temperature: float = 1.0, batch_size: int = 64, seed: int = 0, dtype: str | None = None,
                   threads: int | None = None, budget_marker: str | None = None, trust_remote_code: bool = False) -> dict:
    """`thinkling sweep-stop`: accuracy vs tokens for TS at each α and budget forcing at each B
    (`eval.sweep.stop_sweep`), written to `out`/sweep.json + sweep.png and printed as a table.
    As in `eval`, `samples` > 1 adds sampled completions at `temperature` (pass@1)."""
    configure_eval_threads(model, threads)
    try:
        table = stop_sweep(model, task_cfg, alphas, budgets, out, max_new_tokens, batch_size=batch_size, seed=seed,
                           dtype=dtype, budget_marker=budget_marker, samples=samples,
                           temperature=temperature if samples > 1 else 0.0, trust_remote_code=trust_remote_code)
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
