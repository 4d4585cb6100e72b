"""Sharded policies (`model.fsdp: true`): FSDP2 (`torch.distributed.fsdp.fully_shard`) over the
data-parallel world of `train.distributed`.

Each transformer block, then the whole model, becomes one FSDP unit: a process keeps 1/N of
every weight, gradient and AdamW moment (LoRA: the frozen base is sharded as well, and only
the adapters have gradients and moments). A unit's weights are all-gathered just before its
forward (and again for its backward) and freed after; its gradients are reduce-scattered
after its backward. FSDP's reduce-scatter *sums* here (divide factor 1): the trainers already
divide each process's loss by the whole batch's normaliser, exactly as for the replicated
all-reduce in `DataParallel.sum_gradients`, which is skipped for a sharded model (its
gradients are summed once, by FSDP).

Three rules follow from FSDP's collectives (every process must issue the same all-gathers and
reduce-scatters in the same order):

- Training passes are matched across processes: a process with fewer micro-batches (uneven
  shards, or none at all after dynamic sampling) runs zero-weighted passes (`matched_passes`).
- Everything that is not a training pass (rollouts, π_old and reference log-probs, evaluation,
  saving) runs inside `gathered(model)`: the full weights are all-gathered once, and the
  model then behaves as an unsharded one until the block ends (generation lengths differ per
  process; no collectives may hide inside them). That costs one full copy of the weights per
  process for the duration, as the rollout phase of TRL / verl does.
- A policy's fast paths that read weights outside a module's forward (`output_head`,
  prompt-prefix sharing) are off while sharded (`policy.sharded`): those weights are shards
  there. Log-probs come from the model's forward instead (the `[B, T, V]` logits of a
  micro-batch are built; lower `micro_batch_size` if they are large).

Checkpoints stay the unsharded format: every process takes part in gathering the model's and
optimizer's state (`full_state`), process 0 alone keeps it and writes it (atomically, as for
any run), and a resume with any number of processes, sharded or not, reads it back
(`load_sharded_optimizer`).

FSDP2 runs on CPU with gloo (torch 2.13); its PREMUL_SUM reduction (how it applies a custom
divide factor) does not, hence `set_force_sum_reduction_for_comms` below.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from thinkling.errors import ThinklingError


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def _fsdp():
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError as e:  # torch < 2.6
        raise ThinklingError(f"config key 'model.fsdp': this torch ({torch.__version__}) has no FSDP2 "
                             "(torch.distributed.fsdp.fully_shard)") from e
    return FSDPModule, fully_shard


def is_sharded(model: torch.nn.Module) -> bool:
    if not torch.distributed.is_available():
        return False
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule)


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: the first ModuleList of modules of one type, one layer included (HF
    `model.layers`, the tiny model's blocks; peft keeps them in place)."""
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= 1 and len({type(m) for m in module}) == 1:
            return list(module)
    return []


def shard_policy(policy, data_parallel) -> bool:
    """Shard `policy.model` in place over the world's processes (a world of one: nothing to do).
    Returns whether it sharded. Process 0's weights are broadcast first, so every shard comes
    from the same model; build the optimizer after this call (it holds the shards)."""
    if not data_parallel.enabled:
        return False
    FSDPModule, fully_shard = _fsdp()
    model = policy.model
    data_parallel.broadcast_parameters(model)
    blocks = _blocks(model)
    if not blocks:
        raise ThinklingError(f"config key 'model.fsdp': no transformer blocks found in {type(model).__name__}")
    from torch.distributed.device_mesh import init_device_mesh

    device = data_parallel._device()
    mesh = init_device_mesh(device.type, (data_parallel.world_size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum, not average: the losses are global means already. A plain SUM collective (no
            # PREMUL_SUM, which gloo rejects: "Cannot use ReduceOp.PREMUL_SUM with Gloo").
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    # FSDP initialises its units on the root's first forward and refuses a block's forward before
    # it; a policy may generate through its blocks (the tiny model's decoder, under `gathered`) first.
    model._get_fsdp_state()._lazy_init()
    policy.sharded = True
    return True


def _units(model: torch.nn.Module) -> list:
    if not is_sharded(model):
        return []
    FSDPModule, _ = _fsdp()
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(policy):
    """The policy with its full weights on every process for the block's duration (one
    all-gather per unit on entry, every process together; none inside); a no-op when not
    sharded. The rollout engine's cached copy of those weights is dropped on exit."""
    units = _units(policy.model)
    if not units:
        yield policy
        return
    reshard = [m._get_fsdp_state()._fsdp_param_group._reshard_after_forward for m in units]
    for m in units:
        m.unshard()
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield policy
    finally:
        release = getattr(policy, "release_generation_memory", None)
        if release is not None:  # its copy may point at the gathered storage about to be freed
            release()
        for m, r in zip(units, reshard):
            m.set_reshard_after_forward(r, recurse=False)
            m.reshard()


def maybe_gathered(policy, on: bool = True):
    return gathered(policy) if on else nullcontext(policy)


def matched_passes(data_parallel, model: torch.nn.Module, n_local: int) -> int:
    """How many zero-weighted training passes this process adds so that every process runs as
    many forward/backward passes as the busiest one (0 when the model is not sharded)."""
    if not is_sharded(model):
        return 0
    most = int(data_parallel.max(torch.tensor(float(n_local))))
    return most - n_local


def idle_pass(policy) -> None:
    """A forward/backward pass whose loss is 0 × logits: every unit takes part in the all-gathers
    and reduce-scatters, and adds zero to every gradient."""
    ids = torch.full((1, 2), policy.pad_id, dtype=torch.long, device=next(policy.model.parameters()).device)
    (policy.logits(ids, torch.ones_like(ids)).float().sum() * 0.0).backward()


def to_float(value) -> float:
    """A number that may be a DTensor (a sharded model's grad norm, or a sum over shards)."""
    if isinstance(value, _dtensor()):
        value = value.full_tensor()
    return float(value)


def _full(value, cache: dict, keep: bool):
    """`value` as a plain tensor, gathered if it is a shard (one all-gather; shared tensors once).
    Without `keep` (processes other than 0) the gathered copy is dropped at once: None."""
    if not isinstance(value, _dtensor()):
        return value
    if not keep:
        value.full_tensor()  # every process takes part in the all-gather
        return None
    key = id(value)
    if key not in cache:
        # A copy of its own: the gathered tensor may be a view into a padded all-gather buffer, which
        # savers that check storage (safetensors, for tied weights) refuse.
        cache[key] = value.full_tensor().cpu().clone()
    return cache[key]


@contextmanager
def full_state(policy, optimizer=None):
    """While the block runs, `policy.model.state_dict()` and `optimizer.state_dict()` return the
    full (unsharded) state on process 0, gathered tensor by tensor on entry (call it on every
    process: the others take part and keep nothing, their dicts hold None); the savers
    (`policy.save`, `RunDir.save_checkpoint`, the vLLM server sync) then write the usual
    unsharded files. Process 0 holds the full state in CPU memory meanwhile. A no-op when not sharded."""
    model = policy.model
    if not is_sharded(model):
        yield
        return
    cache: dict = {}
    keep = torch.distributed.get_rank() == 0
    model_state = {k: _full(v, cache, keep) for k, v in model.state_dict().items()}
    optim_state = None
    if optimizer is not None:
        optim_state = optimizer.state_dict()  # states keyed by parameter index, as unsharded
        optim_state["state"] = {i: {k: _full(v, cache, keep) for k, v in s.items()}
                                for i, s in optim_state["state"].items()}
    model.state_dict = lambda *args, **kwargs: dict(model_state)
    if optimizer is not None:
        optimizer.state_dict = lambda: optim_state
    try:
        yield
    finally:
        del model.state_dict
        if optimizer is not None:
            del optimizer.state_dict


def load_sharded_optimizer(optimizer, state: dict) -> None:
    """Load an unsharded optimizer state (a checkpoint's `optimizer.pt`) into the optimizer of a
    sharded model: each moment is cut into this process's shard of its parameter."""
    from torch.distributed.tensor import distribute_tensor

    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, _dtensor()):
                continue
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and not isinstance(value, _dtensor()) and value.shape == p.shape:
                    optimizer.state[p][key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)
