"""Data-parallel SFT: two gloo processes on CPU take the same steps as one process on the full batch."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from thinkling.config import SFTConfig
from thinkling.train.distributed import DataParallel, free_port

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 96}
# batch 7: shards of 4 and 3 examples with different token counts, the case where averaging
# two per-shard means (plain DDP) would differ from the full-batch mean.
# grad_clip off: clipping rescales gradients and would hide a wrong scale of the summed gradient.
CFG = SFTConfig(steps=3, batch_size=7, lr=3e-3, warmup_steps=1, grad_clip=1e6, log_every=1, save_every=100)


def _train(data_parallel=None):
    """3 SFT steps of a fresh tiny model on chain problems: (losses, last gradients, weights)."""
    torch.set_num_threads(1)
    from thinkling.models.tiny import TinyPolicy
    from thinkling.tasks import get_task
    from thinkling.train.sft import sft_examples, train_sft

    task = get_task("chain")
    policy = TinyPolicy.create(TINY, seed=0)
    examples = sft_examples(policy, task, task.problems(32, seed=0, difficulty=[1, 2, 3]))
    losses = []
    train_sft(policy, examples, CFG, seed=0, data_parallel=data_parallel,
              progress=lambda step, loss: losses.append(loss))
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
    return losses, grads, {n: p.detach().clone() for n, p in policy.model.named_parameters()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    dp = DataParallel.from_env()  # accelerate's PartialState opens the gloo group
    assert (dp.rank, dp.world_size) == (rank, world)
    if rank == 1:  # a different start on rank 1 must be overwritten by rank 0's weights
        torch.manual_seed(123)
    result = _train(dp)
    torch.save(result, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_two_processes_equal_one_process_on_the_full_batch(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    single_losses, single_grads, single_weights = _train()
    for rank in (0, 1):
        losses, grads, weights = torch.load(f"{out}.{rank}", weights_only=False)
        assert losses == pytest.approx(single_losses, abs=1e-5)
        assert grads.keys() == single_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, single_grads[name], atol=1e-5, rtol=1e-5, msg=name)
        for name, w in weights.items():
            torch.testing.assert_close(w, single_weights[name], atol=1e-5, rtol=1e-5, msg=name)
    assert single_losses[-1] < single_losses[0]


def test_single_process_world_is_a_no_op():
    dp = DataParallel.from_env()
    assert (dp.rank, dp.world_size, dp.enabled, dp.is_main) == (0, 1, False, True)
    t = torch.ones(3)
    assert dp.sum(t) is t and t.tolist() == [1, 1, 1]
    assert DataParallel(1, 3).shard(list(range(7))) == [1, 4]
    with pytest.raises(Exception, match="cannot be split"):
        DataParallel(0, 4).shard([1, 2])


def _jobs_use_data_parallel() -> bool:
    from thinkling import jobs

    return "data_parallel" in inspect.getsource(jobs.run_sft)


@pytest.mark.skipif(not _jobs_use_data_parallel(), reason="jobs.run_sft does not pass data_parallel yet")
def test_torchrun_cli_sft_writes_one_run_folder(tmp_path):
    """`torchrun -m thinkling.cli sft` (what `accelerate launch --multi_gpu` runs): rank 0 owns the folder."""
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", f"model.tiny={json.dumps(TINY)}", "train.size=32", "train.difficulty=[1,2]",
                 "eval.size=4", "eval.difficulty=1", "sft.steps=2", "sft.batch_size=6", "sft.log_every=1",
                 "eval.max_new_tokens=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "thinkling.cli", "sft", "recipes/chain-sft.yaml", *overrides]
    done = subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # logged once, by rank 0
    assert (out / "final" / "policy.json").exists() and (out / "eval.json").exists()
