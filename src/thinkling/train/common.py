"""Pieces every trainer shares: schedule, optimizer, seeding, resume."""

from __future__ import annotations

import math
import random
import resource
import sys

import torch

from thinkling.errors import ThinklingError
from thinkling.train.sharding import is_sharded, load_sharded_optimizer, to_float


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


def stop_if_not_finite(step: int, **values) -> None:
    """Stop a run whose loss (or gradient) turned NaN / inf before it reaches the weights: the
    optimizer step is not taken and no checkpoint is written, so the last checkpoint stays good."""
    for name, value in values.items():
        value = value.detach() if isinstance(value, torch.Tensor) else value
        if not math.isfinite(float(value)):
            raise ThinklingError(f"step {step}: the {name.replace('_', ' ')} is {float(value)}; stopped before "
                                 "updating the weights (the last checkpoint is kept; lower the learning rate?)")


def adam_step_norm(optimizer: torch.optim.Optimizer) -> float:
    """‖Δθ‖ of the AdamW step just taken, recomputed from the optimizer's moments
    (lr·m̂/(√v̂ + ε) per parameter; the weight-decay part is left out): no copy of the weights,
    which for a full fine-tune would cost as much memory as the model."""
    total = 0.0
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state or "exp_avg" not in state:
                continue
            t = float(state["step"])
            # lr·m̂/(√v̂ + ε) = (lr / (1 - β1^t)) · m / (√v / √(1 - β2^t) + ε): the scalar once, outside
            sq = 0.0
            for m, v in pieces(state["exp_avg"], state["exp_avg_sq"]):
                step = m / v.sqrt().mul_((1 - beta2**t) ** -0.5).add_(group["eps"])
                sq += to_float(step.pow_(2).sum())
            total += sq * (group["lr"] / (1 - beta1**t)) ** 2
    return total**0.5


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the gradient norm; returns the norm before clipping. For a sharded model the norm
    is over all shards (DTensor gradients: clip_grad_norm_ all-reduces the squared sums)."""
    return to_float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))


def weight_norm(model: torch.nn.Module) -> float:
    """‖θ‖ over the trainable weights (all shards of a sharded model)."""
    return sum(to_float(x.pow(2).sum()) for p in model.parameters() if p.requires_grad
               for (x,) in pieces(p.detach())) ** 0.5


PIECE = 2**20  # elements: a temporary this size is reused from the heap, a model-sized one is fresh pages


def pieces(*tensors: torch.Tensor):
    """Aligned flat pieces of same-shaped tensors, for elementwise statistics whose temporaries
    would otherwise be as large as a parameter (SmolLM2's embedding: 113 MB each, page-faulted
    anew every step). A sharded (DTensor) parameter comes whole."""
    if any(type(t) is not torch.Tensor for t in tensors):
        yield tensors
        return
    yield from zip(*(t.reshape(-1).split(PIECE) for t in tensors))


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


def load_optimizer_state(optimizer: torch.optim.Optimizer, path, model: torch.nn.Module | None = None) -> None:
    """A checkpoint's optimizer state (always unsharded); cut into shards for a sharded `model`."""
    try:
        state = torch.load(path, weights_only=True)
        if model is not None and is_sharded(model):
            load_sharded_optimizer(optimizer, state)
        else:
            optimizer.load_state_dict(state)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise ThinklingError(f"{path}: cannot restore optimizer state ({e})") from None


def run_steps(cfg, take_step, *, run=None, start_step: int = 0, evaluate=None, eval_every: int = 0, progress=None,
              samples=None, save=None) -> None:
    """The step loop of the on-policy trainers (RL, rollout DPO), steps `start_step` .. `cfg.steps` − 1.

    `take_step(step) -> metrics`; the metrics go to `run` every `cfg.log_every` steps and at the
    end, `samples()` rows to its samples every `cfg.samples_every` steps, `evaluate(step)` runs at
    step 0 of a fresh run and every `eval_every` steps before the last (the caller evaluates the
    final policy), `save(done)` every `cfg.save_every` steps and at the end, `progress(done, metrics)`
    after each step. One loop, so that resume, logging and checkpoints follow the same schedule."""
    if evaluate is not None and start_step == 0 and eval_every:
        evaluate(0)
    for step in range(start_step, cfg.steps):
        metrics = take_step(step)
        done = step + 1
        if run is not None and (done % cfg.log_every == 0 or done == cfg.steps):
            run.log(done, metrics)
        if run is not None and samples is not None and cfg.samples_every and done % cfg.samples_every == 0:
            run.write_samples(done, samples())
        if evaluate is not None and eval_every and done % eval_every == 0 and done != cfg.steps:
            evaluate(done)
        if run is not None and save is not None and (done % cfg.save_every == 0 or done == cfg.steps):
            save(done)
        if progress is not None:
            progress(done, metrics)
