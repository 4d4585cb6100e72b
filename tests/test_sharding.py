"""Sharded policies (`model.fsdp`, train.sharding): two gloo processes holding FSDP2 shards of a
tiny HF Llama take the steps one unsharded process takes on the whole batch, SFT and GRPO,
full fine-tune and LoRA; checkpoints written by the sharded run are the unsharded format and
resume exactly, sharded or not."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")
from test_distributed_rl import LengthLottery, _init  # noqa: E402  (tests/ is on sys.path)
from test_hf_policy import make_model, make_tokenizer  # noqa: E402

from thinkling.config import RLConfig, SFTConfig  # noqa: E402
from thinkling.train.distributed import free_port  # noqa: E402

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}
# 5 examples / prompts per step: shards of 3 and 2; micro-batches of 2 rows: 2 passes against 1
# (the idle pass). grad_clip small enough that clipping acts: only the norm over all shards
# gives the unsharded step.
SFT = SFTConfig(steps=3, batch_size=5, lr=3e-3, warmup_steps=0, grad_clip=0.05, micro_batch_size=2, save_every=2,
                log_every=1)
RL = RLConfig(steps=2, prompts_per_step=5, group_size=3, max_new_tokens=6, lr=3e-3, grad_clip=0.05,
              kl_to_start=False, samples_every=0, micro_batch_size=2, minibatches=2)  # π_old computed (gathered)
PAIRS = [("add 1 and 2", "3"), ("say hi", "hi there"), ("count to 3", "1 2 3"), ("spell cat", "c a t"),
         ("reverse ab", "ba"), ("double 4", "8"), ("what is 2+2", "4, surely"), ("name a colour", "red")]
CASES = ("sft", "sft-lora", "rl", "rl-lora", "rl-tiny")  # tiny: generates through its blocks (under `gathered`)
TINY = {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 128}


def _policy(base: str, case: str):
    from thinkling.models.hf import HFPolicy
    from thinkling.models.tiny import TinyPolicy

    if case.endswith("tiny"):
        return TinyPolicy.create(TINY, seed=0)
    return HFPolicy.load(base, lora=LORA if case.endswith("lora") else None, device="cpu")


def _weights(policy) -> dict:
    from thinkling.train.sharding import full_state

    with full_state(policy):
        return {k: v.detach().clone() for k, v in policy.model.state_dict().items() if v is not None}  # None: rank 1


def _train(case: str, base: str, dp=None, run=None, resume_from=None, metrics=None):
    """`case` trained from the base model, or resumed from the checkpoint folder `resume_from`
    (as `jobs` does it: load, shard, then the optimizer and its saved state). RL appends each
    step's metrics to `metrics`."""
    from thinkling.models import load_policy
    from thinkling.train.common import load_optimizer_state, make_optimizer
    from thinkling.train.rl import resolve_knobs, train_rl
    from thinkling.train.sft import make_example, train_sft
    from thinkling.train.sharding import shard_policy

    torch.set_num_threads(1)
    torch.manual_seed(0)
    policy = _policy(base, case) if resume_from is None else load_policy(resume_from / "policy")
    if dp is not None:
        assert shard_policy(policy, dp)
    optimizer, start = None, 0
    if resume_from is not None:
        optimizer = make_optimizer(policy.model, SFT.lr, SFT.weight_decay)
        load_optimizer_state(optimizer, resume_from / "optimizer.pt", policy.model)
        start = int(resume_from.name.removeprefix("step_"))
    if case.startswith("sft"):
        examples = [make_example(policy, policy.encode_prompt(q), a) for q, a in PAIRS]
        train_sft(policy, examples, SFT, seed=0, data_parallel=dp, run=run, start_step=start, optimizer=optimizer)
    else:
        task = LengthLottery()
        problems = task.problems(10, seed=0, difficulty=[3])
        train_rl(policy, task, problems, RL, resolve_knobs(RL), seed=0, data_parallel=dp, run=run,
                 progress=lambda step, m: metrics.append(m) if metrics is not None else None)
    return policy


def _worker(rank: int, world: int, port: int, base: str, out: str, run_dir: str) -> None:
    from thinkling.config import RunConfig
    from thinkling.train.sharding import is_sharded

    dp = _init(rank, world, port)
    results = {}
    for case in CASES:
        metrics = []
        policy = _train(case, base, dp, metrics=metrics)
        assert is_sharded(policy.model) and policy.sharded
        local = next(p for p in policy.model.parameters() if p.requires_grad)
        results[case] = (_weights(policy), tuple(local.to_local().shape), tuple(local.shape), metrics)
    # A sharded run writing checkpoints (process 0), then resumed sharded from its step-2 checkpoint.
    run = dp.run_dir(run_dir, RunConfig())
    results["sft-checkpointed"] = _weights(_train("sft", base, dp, run=run))
    results["sft-resumed"] = _weights(_train("sft", base, dp, resume_from=run.ckpt_dir / "step_000002"))
    if rank == 0:
        torch.save(results, out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    from thinkling.models.hf import HFPolicy

    tmp = tmp_path_factory.mktemp("fsdp")
    base = str(tmp / "base")
    HFPolicy(make_model(), make_tokenizer()).save(base)
    out, run_dir = str(tmp / "result.pt"), str(tmp / "run")
    mp.spawn(_worker, args=(2, free_port(), base, out, run_dir), nprocs=2, join=True)
    return base, run_dir, torch.load(out, weights_only=False)


def _close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("case", CASES)
def test_a_sharded_step_is_the_unsharded_one(sharded, case):
    base, _, results = sharded
    weights, local_shape, full_shape, metrics = results[case]
    assert local_shape[0] < full_shape[0]  # each process held a shard, not a replica
    single_metrics = []
    single = _weights(_train(case, base, metrics=single_metrics))
    _close(weights, single)
    for got, want in zip(metrics, single_metrics, strict=True):  # RL: the summed loss, the norm over all shards
        for key in ("loss", "grad_norm", "weight_norm", "update_norm_rel"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key  # the loss sums signed terms
    start = _weights(_policy(base, case))
    moved = max(float((single[k] - start[k]).abs().max()) for k in single)
    assert moved > 1e-3  # the steps moved the trained weights far beyond the tolerance
    if case.endswith("lora"):  # LoRA: only the adapters train; the sharded base came back unchanged
        assert all(torch.equal(single[k], start[k]) for k in single if "lora_" not in k)


def test_sharded_checkpoints_are_unsharded_and_resume_for_any_world(sharded, tmp_path):
    from thinkling.models import load_policy

    base, run_dir, results = sharded
    single = _weights(_train("sft", base))
    _close(results["sft-checkpointed"], single)
    ckpts = Path(run_dir) / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000003"
    _close(load_policy(ckpts / "step_000003" / "policy").model.state_dict(), single)  # the files are whole
    _close(results["sft-resumed"], single)  # resumed by 2 sharded processes
    _close(_weights(_train("sft", base, resume_from=ckpts / "step_000002")), single)  # ... and by one process


def test_fsdp_in_a_world_of_one_is_a_no_op_and_vllm_in_process_is_refused():
    from thinkling.config import ModelConfig
    from thinkling.errors import ThinklingError
    from thinkling.models.tiny import TinyPolicy
    from thinkling.train.distributed import DataParallel
    from thinkling.train.sharding import shard_policy

    policy = TinyPolicy.create({"d_model": 16, "n_layers": 2, "n_heads": 2, "max_seq_len": 32})
    assert not shard_policy(policy, DataParallel()) and not policy.sharded
    with pytest.raises(ThinklingError, match="model.fsdp"):
        dataclasses.replace(ModelConfig(backend="hf", name="x", fsdp=True, generator="vllm")).validate()


def test_a_one_layer_model_has_a_block_to_shard():
    """A one-layer model was refused ('no transformer blocks found') though it shards like any other."""
    from thinkling.models.tiny import TinyPolicy
    from thinkling.train.sharding import _blocks

    for layers in (1, 3):
        policy = TinyPolicy.create({"d_model": 32, "n_layers": layers, "n_heads": 2}, seed=0)
        assert _blocks(policy.model) == list(policy.model.blocks)
