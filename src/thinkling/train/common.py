"""Pieces every trainer shares: schedule, optimizer, seeding, resume."""

from __future__ import annotations

import math
import random
import resource
import sys

import torch

from thinkling.errors import ThinklingError


def lr_at(step: int, *, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up then cosine decay to `min_ratio * base_lr`; a pure function of the step,
    so a resumed run needs no scheduler state."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; parameters may carry their own `lr_scale` attribute (e.g. SSA temperatures)."""
    groups: dict[float, list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault(getattr(p, "lr_scale", 1.0), []).append(p)
    return torch.optim.AdamW(
        [{"params": ps, "lr": lr * s, "lr_scale": s} for s, ps in groups.items()],
        lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95),
    )


def weights_changed(policy) -> None:
    """Tell a policy whose generator keeps its own copy of the weights (vLLM) that they moved."""
    hook = getattr(policy, "weights_changed", None)
    if hook is not None:
        hook()


def peak_rss_gb() -> float:
    """This process's peak resident memory so far, in GiB (getrusage: one system call, no polling).

    Logged by the trainers as `mem/peak_rss_gb`; it never goes down, so a step that raised it
    is the first step whose value is higher."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A random stream that depends only on (seed, step): batches and samples of step N are
    the same whether or not the run was interrupted before it."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def load_optimizer_state(optimizer: torch.optim.Optimizer, path) -> None:
    try:
        optimizer.load_state_dict(torch.load(path, weights_only=True))
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise ThinklingError(f"{path}: cannot restore optimizer state ({e})") from None
