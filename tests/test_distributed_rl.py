"""Data-parallel RL: two gloo processes on CPU take the same steps as one process on the whole batch.

The task is a lottery on the completion's characters (correct for about one completion in
three), so an untrained tiny model gets mixed rewards in most groups, whole groups fail (BREAD
branches them) and some groups have equal rewards (dynamic sampling drops and refills them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from thinkling.config import BreadConfig, RLConfig, load_recipe
from thinkling.tasks.base import Verdict
from thinkling.tasks.chain import ChainTask
from thinkling.train.distributed import DataParallel, free_port

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 128}
# 5 prompts: shards of 3 and 2 groups. grad_clip off: clipping would hide a wrong gradient scale.
BASE = RLConfig(steps=3, prompts_per_step=5, group_size=3, max_new_tokens=8, lr=3e-3, grad_clip=1e6,
                kl_to_start=False, samples_every=0)
CASES = {
    "grpo": BASE,
    # π_old frozen over 2 epochs of 2 minibatches cut from the rows of the whole step; micro-batches of 2 rows.
    "grpo-minibatches": dataclasses.replace(BASE, ppo_epochs=2, minibatches=2, micro_batch_size=2),
    # token-mean over the whole batch; dropped groups refilled over 2 extra rounds (some of 1 prompt).
    "dapo-refill": dataclasses.replace(BASE, algorithm="dapo", resample_rounds=2),
    # failed groups branched from expert anchors; anchors remembered across steps and processes.
    "bread": dataclasses.replace(BASE, steps=4, bread=BreadConfig(enabled=True)),
    "bread-kl": dataclasses.replace(BASE, beta=0.1, kl_to_start=True, bread=BreadConfig(enabled=True, max_probes=2)),
    # a curriculum sampler learning from every group's outcome, wherever it was sampled.
    "grpo-bandit": dataclasses.replace(BASE, steps=4),
}
SAMPLERS = {"grpo-bandit": "bandit"}  # case -> curriculum.sampler (default uniform)


class LengthLottery(ChainTask):
    """Chain problems (with expert steps for BREAD) scored by a die the completion's characters throw."""

    def verify(self, problem, completion):
        return Verdict(correct=sum(map(ord, completion)) % 3 == 0, extracted=None)


def _train(case: str, data_parallel=None):
    """A few RL steps of a fresh tiny model: (each step's metrics, weights, last gradients, trainer state)."""
    torch.set_num_threads(1)
    cfg = CASES[case]
    from thinkling.config import CurriculumConfig
    from thinkling.data.curriculum import make_sampler
    from thinkling.models.tiny import TinyPolicy
    from thinkling.train.rl import resolve_knobs, train_rl

    task = LengthLottery()
    problems = task.problems(12, seed=0, difficulty=[3, 4])
    sampler = make_sampler(CurriculumConfig(sampler=SAMPLERS.get(case, "uniform"), buckets=2), problems, cfg.steps)
    policy = TinyPolicy.create(TINY, seed=0)
    reference = TinyPolicy.create(TINY, seed=0) if cfg.kl_to_start else None
    metrics = []
    trainer = train_rl(policy, task, problems, cfg, resolve_knobs(cfg), seed=0, reference=reference,
                       data_parallel=data_parallel, sampler=sampler, progress=lambda step, m: metrics.append(m))
    weights = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    return metrics, weights, grads, trainer.state()


def _init(rank: int, world: int, port: int) -> DataParallel:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    dp = DataParallel.from_env()
    assert (dp.rank, dp.world_size) == (rank, world)
    return dp


def _train_worker(rank: int, world: int, port: int, out: str) -> None:
    from thinkling.train import distributed

    distributed.GRAD_BUCKET = 3000  # several buckets, some of one large tensor (in place), some flat copies
    dp = _init(rank, world, port)
    torch.save({name: _train(name, dp) for name in CASES}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    """Every case trained once by two processes (one spawn for all: starting processes is the slow part)."""
    out = str(tmp_path_factory.mktemp("dp_rl") / "result")
    mp.spawn(_train_worker, args=(2, free_port(), out), nprocs=2, join=True)
    return [torch.load(f"{out}.{rank}", weights_only=False) for rank in (0, 1)]


def _same_metrics(got: dict, want: dict) -> None:
    keys = {k for k in want if not k.startswith(("time/", "mem/"))}
    assert keys == {k for k in got if not k.startswith(("time/", "mem/"))}
    for k in keys:
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5), k


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_take_the_one_process_steps(two_process_results, case):
    single_metrics, single_weights, single_grads, single_state = _train(case)
    for rank in (0, 1):
        metrics, weights, grads, state = two_process_results[rank][case]
        assert len(metrics) == len(single_metrics)
        for got, want in zip(metrics, single_metrics):
            _same_metrics(got, want)
        # The last update's summed gradient: equal up to float summation order, whose error scales
        # with the tensor's largest entries (seen: 2e-4 of the largest on an AVX-512 CPU, where the
        # refilled DAPO batch sums its groups in another order; a missing or doubled shard is O(1)).
        assert grads.keys() == single_grads.keys()
        for name, g in grads.items():
            want = single_grads[name]
            atol = max(1e-6, 5e-4 * float(want.abs().max()))
            torch.testing.assert_close(g, want, atol=atol, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        # Weights after all steps: AdamW divides by √v, so an element whose gradient is ~0 turns
        # rounding noise into up to a step of size lr (3e-3); 1e-4 is a thirtieth of that.
        for name, w in weights.items():
            torch.testing.assert_close(w, single_weights[name], atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        assert state == single_state  # BREAD's anchor memory and the token totals: the same everywhere
    # The case exercises what it names, and the weights moved far more than the tolerance.
    from thinkling.models.tiny import TinyPolicy

    start = {n: p.detach() for n, p in TinyPolicy.create(TINY, seed=0).model.named_parameters()}
    assert max(float((w - start[n]).abs().max()) for n, w in single_weights.items()) > 1e-3
    assert any(not m.get("skipped_update") for m in single_metrics)
    if case.startswith("bread"):
        assert sum(m["bread/anchored"] for m in single_metrics) > 0
        assert single_state["anchor_memory"]
    if case in SAMPLERS:
        assert single_state["sampler"]["progress"] != [0.0, 0.0]  # it learnt from outcomes
    if case == "dapo-refill":
        assert sum(m["groups_dropped_equal"] for m in single_metrics) > 0
        assert sum(m["groups_sampled"] for m in single_metrics) > 3 * CASES[case].prompts_per_step


# ------------------------------------------------------------------ resume, through the CLI's job
def _overrides(out: Path) -> list[str]:
    return [f"output_dir={out}", f"model.tiny={json.dumps(TINY)}", "model.init=null", "train.name=length-lottery",
            "train.size=16",
            "train.difficulty=[3]", "eval.size=2", "eval.difficulty=3", "eval.max_new_tokens=8", "eval.samples=1",
            "eval.every=0", "rl.steps=4", "rl.prompts_per_step=4", "rl.group_size=2", "rl.max_new_tokens=8",
            "rl.save_every=2", "rl.lr=3e-3", "rl.bread.enabled=true", "rl.kl_to_start=false"]


def _job(out: Path, resume: bool = False, crash_at: int | None = None, finish: bool = True) -> None:
    """`jobs.run_rl` (what `thinkling rl` runs) on `LengthLottery`, every process stopping at step
    `crash_at` (after the checkpoint of the step before). `finish=False` skips the final save,
    evaluation and report (its plots take seconds); the last checkpoint holds the same policy."""
    from thinkling import jobs
    from thinkling.tasks.base import _REGISTRY
    from thinkling.train import rl

    step = rl.RLTrainer.step

    def crashing_step(self, i, total):
        if i == crash_at:
            raise KeyboardInterrupt("killed")  # every process dies at the same step, after checkpoint 2
        return step(self, i, total)

    rl.RLTrainer.step = crashing_step
    done = jobs.finish
    if not finish:
        jobs.finish = lambda *args, **kwargs: {}
    _REGISTRY["length-lottery"] = LengthLottery  # for this run only: other tests list the tasks
    try:
        cfg = load_recipe("recipes/quickstart/grpo.yaml", _overrides(out))
        jobs.run_rl(cfg, resume=resume)
    except KeyboardInterrupt:
        pass
    finally:
        rl.RLTrainer.step = step
        jobs.finish = done
        del _REGISTRY["length-lottery"]


def _job_worker(rank: int, world: int, port: int, runs: list) -> None:
    _init(rank, world, port)
    os.chdir(Path(__file__).parents[1])
    for out, resume, crash_at, finish in runs:
        _job(Path(out), resume, crash_at, finish)
        torch.distributed.barrier()  # rank 0 finishes the folder before the next run reads it
    torch.distributed.destroy_process_group()


def test_two_process_run_stopped_and_resumed_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    from thinkling.models import load_policy

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    runs = [(str(a), False, None, True), (str(b), False, 2, False), (str(c), False, 2, False)]
    mp.spawn(_job_worker, args=(2, free_port(), runs), nprocs=2, join=True)
    assert (a / "final" / "policy.json").exists() and (a / "eval.json").exists()  # written by process 0
    for run in (b, c):
        assert (run / "checkpoints" / "latest").read_text() == "step_000002" and not (run / "final").exists()
    mp.spawn(_job_worker, args=(2, free_port(), [(str(b), True, None, False)]), nprocs=2, join=True)
    monkeypatch.chdir(Path(__file__).parents[1])
    _job(c, resume=True, finish=False)  # the same checkpoint resumed by one process

    last = lambda run: load_policy(run / "checkpoints" / "step_000004" / "policy").model.state_dict()
    wa = last(a)
    for run, exact in ((b, True), (c, False)):
        wr = last(run)
        for name in wa:
            if exact:
                assert torch.equal(wa[name], wr[name]), name
            else:  # summation order differs; see the AdamW note above
                torch.testing.assert_close(wr[name], wa[name], atol=1e-4, rtol=1e-4, msg=name)
    rows = {run: [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (a, b, c)}
    rows = {run: [r for r in rs if "reward_mean" in r] for run, rs in rows.items()}
    key = lambda rs: [(r["step"], r.get("reward_mean"), r.get("bread/probe_groups")) for r in rs]
    trained = rows[a]
    assert [r["step"] for r in trained] == [1, 2, 3, 4]  # logged once, by process 0
    assert sum(not r.get("skipped_update") for r in trained) >= 2 and any(r["bread/anchored"] for r in trained)
    assert key(rows[b]) == key(rows[a])
    assert [(s, p) for s, _, p in key(rows[c])] == [(s, p) for s, _, p in key(rows[a])]
    assert json.loads((b / "checkpoints" / "step_000004" / "state.json").read_text())["anchor_memory"] == \
        json.loads((a / "checkpoints" / "step_000004" / "state.json").read_text())["anchor_memory"]


def test_a_world_without_a_rendezvous_is_one_error_line(tmp_path):
    """WORLD_SIZE > 1 without what torchrun sets (MASTER_ADDR): one line and exit 2, no traceback."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "thinkling.cli", "rl", "recipes/quickstart/grpo.yaml", *[o for o in _overrides(tmp_path / "r") if not o.startswith("train.name")]]
    done = subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [x for x in (done.stdout + done.stderr).splitlines() if x.strip()]
    assert len(lines) == 1 and "cannot open the gloo process group" in lines[0] and "MASTER_ADDR" in lines[0], lines
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("verb", ["rl", "sft"])
def test_more_processes_than_a_step_can_share_is_one_error_line(tmp_path, monkeypatch, capsys, verb):
    """A launch, or a resume of a run started with fewer processes, whose world is larger than a
    step's batch: one line naming the key, exit 2, nothing written (checked before any collective)."""
    from thinkling import cli, jobs

    monkeypatch.chdir(Path(__file__).parents[1])
    monkeypatch.setattr(jobs.DataParallel, "from_env", classmethod(lambda cls: cls(rank=0, world_size=8)))
    out = tmp_path / "run"
    recipe = "recipes/quickstart/grpo.yaml" if verb == "rl" else "recipes/chain-sft.yaml"
    batch = "rl.prompts_per_step=4" if verb == "rl" else "sft.batch_size=4"
    for resume in ([], ["--resume"]):
        assert cli.main([verb, recipe, f"output_dir={out}", "model.init=null", f"model.tiny={json.dumps(TINY)}",
                         batch, *resume]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and batch.split("=")[0] in err[0] and "8 processes" in err[0], err
        assert not out.exists()
