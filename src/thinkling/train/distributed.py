"""Data-parallel SFT across processes started by `torchrun` or `accelerate launch`.

Every process holds a full replica of the policy. A training step draws the
same per-step batch everywhere (the batch stream depends only on seed and
step), each process keeps its shard of it, and the gradients are summed across
processes before clipping and the optimizer step, so every replica takes the
same step as one process on the whole batch would:

- each process's loss is its share of the *global* weighted mean,
  Σ_shard w·CE / Σ_batch w, with the denominator all-reduced first;
- summing those gradients gives the gradient of the full-batch loss exactly
  (DDP's averaging of per-process means is only equal for equal shard weights).

The gradient exchange is the all-reduce that `DistributedDataParallel` does,
written out with `torch.distributed.all_reduce` so the policy keeps its own,
unwrapped model: `policy.logits`, `generate` and `save` need no DDP awareness.
accelerate's `PartialState` reads the launcher's environment and opens the
process group (gloo on CPU, nccl on GPUs).

Launch (one process per replica; CPU-only hosts included):

    torchrun --nproc-per-node 2 -m thinkling.cli sft RECIPE
    accelerate launch --multi_gpu --num_processes 2 -m thinkling.cli sft RECIPE

(`--multi_gpu` only picks accelerate's torchrun launcher; `--cpu --num_processes N`
would need mpirun.) Process 0 owns the run folder: it logs, checkpoints and
evaluates; the others only train.

RL (`train.rl`) uses the same class: besides gradients it sums the step's counts
(`reduce`: loss denominators, kept groups, metric sums) and shares BREAD's
remembered anchors (`gather`), see docs/scale.md.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from thinkling.errors import ThinklingError
from thinkling.runs import RunDir
from thinkling.train.sharding import is_sharded

# Elements per gradient all-reduce (64 MiB of fp32), as DDP's buckets: the flat copy stays small.
GRAD_BUCKET = 2**24


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the data-parallel world (a world of 1 when not launched)."""

    rank: int = 0
    world_size: int = 1
    # Seconds spent in collectives (waiting for the slowest process included): `comm_seconds()`.
    _clock: dict = field(default_factory=lambda: {"comm": 0.0}, compare=False, repr=False)

    @classmethod
    def from_env(cls) -> DataParallel:
        """The world set up by torchrun / accelerate launch (WORLD_SIZE > 1), else a single process.
        A process group that cannot come up (no backend, no rendezvous address) is one ThinklingError."""
        world = os.environ.get("WORLD_SIZE", "1")
        if int(world) <= 1:
            return cls()
        if not torch.distributed.is_available():
            raise ThinklingError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
        from accelerate import PartialState

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        try:
            # cpu=True makes accelerate pick gloo when the launcher is torchrun on a host without GPUs.
            state = PartialState(cpu=backend == "gloo")
        except (RuntimeError, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ThinklingError(f"WORLD_SIZE={world}: cannot open the {backend} process group ({reason}); "
                                 "launch with torchrun or accelerate launch") from None
        if not torch.distributed.is_initialized() or state.num_processes < 2:
            raise ThinklingError(f"WORLD_SIZE={world} but no process group came up")
        return cls(state.process_index, state.num_processes)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------- collectives
    def shard(self, items: list) -> list:
        """This process's share of a list, round-robin: shards differ in size by at most one."""
        if len(items) < self.world_size:
            raise ThinklingError(f"a batch of {len(items)} cannot be split over {self.world_size} processes")
        return items[self.rank :: self.world_size]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) in place; returns the tensor."""
        return self._all_reduce(tensor, torch.distributed.ReduceOp.SUM) if self.enabled else tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (max) in place; returns the tensor."""
        return self._all_reduce(tensor, torch.distributed.ReduceOp.MAX) if self.enabled else tensor

    def _all_reduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        """In place, wherever the tensor lives: nccl reduces only GPU tensors, so a CPU count
        travels to the GPU and back."""
        device = self._device()
        with self._timed():
            if tensor.device == device:
                torch.distributed.all_reduce(tensor, op=op)
            else:
                moved = tensor.to(device)
                torch.distributed.all_reduce(moved, op=op)
                tensor.copy_(moved)
        return tensor

    def gather(self, obj) -> list:
        """Every process's `obj` (picklable), in rank order."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        with self._timed():
            torch.distributed.all_gather_object(out, obj)
        return out

    def reduce(self, sums: dict, maxes: dict | None = None) -> dict:
        """Named numbers summed (`sums`) or maxed (`maxes`) over processes, in float64.

        The names are the union over processes (a missing sum counts 0, a missing max -inf):
        a process that has nothing of a kind this step (no groups left, no BREAD branch, no
        rows in a minibatch) still takes part, and every process gets the same dict."""
        maxes = maxes or {}
        if not self.enabled:
            return {**{k: float(v) for k, v in sums.items()}, **{k: float(v) for k, v in maxes.items()}}
        names = self.gather((sorted(sums), sorted(maxes)))
        sum_names = sorted(set().union(*(n for n, _ in names)))
        max_names = sorted(set().union(*(n for _, n in names)))
        device = self._device()
        s = torch.tensor([float(sums.get(k, 0.0)) for k in sum_names], dtype=torch.float64, device=device)
        m = torch.tensor([float(maxes.get(k, float("-inf"))) for k in max_names], dtype=torch.float64, device=device)
        self.sum(s)
        self.max(m)
        return {**dict(zip(sum_names, s.tolist())), **dict(zip(max_names, m.tolist()))}

    def comm_seconds(self) -> float:
        """Seconds this process has spent in collectives so far (including waiting for the others)."""
        return self._clock["comm"]

    @contextmanager
    def _timed(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._clock["comm"] += time.perf_counter() - t0

    def _device(self) -> torch.device:
        """Where collective buffers must live: the process's GPU under nccl, else the CPU."""
        if torch.distributed.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def broadcast_parameters(self, model: torch.nn.Module) -> None:
        """Make every replica start from process 0's trainable weights (DDP does the same when it
        wraps a model), so a differently seeded initialisation (LoRA, a fresh tiny model) cannot
        make them drift apart. Frozen weights come from the same files everywhere."""
        if self.enabled and not is_sharded(model):  # sharded: `shard_policy` broadcast before cutting
            for p in model.parameters():
                if p.requires_grad:
                    torch.distributed.broadcast(p.data, src=0)

    def sum_gradients(self, model: torch.nn.Module) -> None:
        """Sum gradients over processes, a bucket of up to `GRAD_BUCKET` elements per all-reduce
        (few collectives, and the flat copy stays small: a copy of all gradients would cost as
        much memory as the gradients themselves).

        A parameter has a gradient after the sum iff it had one on some process: one without
        rows this step (RL after dynamic sampling) gets zeros where the others have gradients,
        and a parameter no process touched stays without one, as in a single process.
        A sharded model's gradients are already summed (FSDP's reduce-scatter, train.sharding).
        """
        if not self.enabled or is_sharded(model):
            return
        params = [p for p in model.parameters() if p.requires_grad]
        has = self.max(torch.tensor([float(p.grad is not None) for p in params], device=self._device())).cpu()
        for p, h in zip(params, has.tolist()):
            if h and p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[torch.Tensor] = []
        size = 0
        for g in (p.grad for p in model.parameters() if p.grad is not None):
            bucket.append(g)
            size += g.numel()
            if size >= GRAD_BUCKET:
                self._sum_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            self._sum_bucket(bucket)

    def _sum_bucket(self, grads: list[torch.Tensor]) -> None:
        if len(grads) == 1 and grads[0].is_contiguous():  # one large tensor: in place, no copy
            self.sum(grads[0])
            return
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def barrier(self) -> None:
        if self.enabled:
            with self._timed():
                torch.distributed.barrier()

    # ------------------------------------------------------------- run folder
    def run_dir(self, path: str | Path, config, resume: bool = False) -> RunDir:
        """Process 0 creates (or reopens) the run folder; the others get a read-only view of it,
        enough to find the checkpoint to resume from, that writes nothing."""
        if not self.enabled:
            return RunDir(path, config, resume=resume)
        run = RunDir(path, config, resume=resume) if self.is_main else None
        self.barrier()  # the folder (and its checks) come first
        return run if run is not None else ReplicaRun(path)


class ReplicaRun(RunDir):
    """A run folder seen from a process other than 0: reads checkpoints, writes nothing."""

    def __init__(self, path: str | Path):  # no RunDir.__init__: that creates and writes files
        self.path = Path(path)
        self.ckpt_dir = self.path / "checkpoints"
        self._tb = None
        self._rows = 0

    def log(self, step, metrics) -> None:
        pass

    def truncate_metrics(self, rows) -> None:
        pass

    def write_samples(self, step, rows) -> None:
        pass

    def save_checkpoint(self, step, policy, optimizer, state):
        return None


def free_port() -> int:
    """A free TCP port on this host for a rendezvous (MASTER_PORT) or a test server: bound, then
    released before use, as torchrun picks one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
