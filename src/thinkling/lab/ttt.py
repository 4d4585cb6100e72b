"""Test-time training for in-context learning (arXiv 2503.11842), on linear regression.

A prompt is n demonstrations (x_i, y_i = ⟨w, x_i⟩ + noise) and a query x. The
model is a small linear-attention transformer over tokens z_i = (x_i, y_i),
the query token carrying y = 0; its prediction is the query's y slot after
the layers. It is pretrained on prompts whose w comes from one distribution.

Test-time training adapts a copy of the weights *per prompt*: the prompt's own
demonstrations are split into folds, each fold in turn is the targets while
the rest are the context, and a few gradient steps on that loss precede the
prediction of the query with all demonstrations as context. Two shift knobs
separate test prompts from pretraining: `task_rank` draws the weights from a
low-dimensional subspace (same E‖w‖²), `x_condition` makes the inputs'
covariance anisotropic (same trace).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from thinkling.errors import ThinklingError
from thinkling.train.common import lr_at, make_optimizer, set_lr, step_generator


@dataclass(frozen=True)
class RegressionPrompts:
    """In-context linear regression, y = ⟨w, x⟩ + noise; the defaults are the pretraining
    distribution x ~ N(0, I), w ~ N(0, I).

    Task shift: w is Gaussian in a fixed random `task_rank`-dimensional subspace,
    scaled so E‖w‖² = dim. Covariate shift: x ~ N(0, Σ) with Σ's eigenvalues
    log-spaced over a ratio of `x_condition` in a fixed random basis, mean 1.
    """

    dim: int = 8
    noise: float = 0.0
    task_rank: int | None = None  # None = dim: no task shift
    x_condition: float = 1.0  # 1: no covariate shift
    shift_seed: int = 0

    def __post_init__(self):
        rank = self.dim if self.task_rank is None else self.task_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= self.dim:
            raise ThinklingError(f"ttt 'task_rank': must be an integer in 1..dim={self.dim} (got {self.task_rank!r})")
        if isinstance(self.x_condition, bool) or not isinstance(self.x_condition, (int, float)) or self.x_condition < 1:
            raise ThinklingError(f"ttt 'x_condition': must be a number >= 1 (got {self.x_condition!r})")

    def rotation(self) -> torch.Tensor:
        """`[dim, dim]` orthonormal; its first task_rank columns span the tasks' subspace."""
        g = torch.Generator().manual_seed(self.shift_seed)
        return torch.linalg.qr(torch.randn(self.dim, self.dim, generator=g))[0]

    def sample(self, batch: int, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """x `[batch, n+1, dim]` and y `[batch, n+1]`: n demonstrations, then the query."""
        rotation = self.rotation()
        rank = self.dim if self.task_rank is None else self.task_rank
        w = torch.randn(batch, rank, generator=generator) @ rotation[:, :rank].T * (self.dim / rank) ** 0.5
        scales = torch.logspace(-0.5, 0.5, self.dim, base=float(self.x_condition))
        x = torch.randn(batch, n + 1, self.dim, generator=generator) * (scales / scales.mean()).sqrt() @ rotation.T
        y = (x @ w[:, :, None]).squeeze(-1) + self.noise * torch.randn(batch, n + 1, generator=generator)
        return x, y


def linear_attention(w_kq: torch.Tensor, w_pv: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                     context: torch.Tensor) -> torch.Tensor:
    """Predictions `[B, N]` (the y slot of every token after the layers).

    Tokens z_i = (x_i, y_i·context_i); each layer adds Σ_j (z_iᵀ W_kq z_j) z_j W_pv / n_ctx over
    the context tokens j. Weights are `[L, D, D]` (shared) or `[B, L, D, D]` (one copy per prompt).
    """
    z = torch.cat((x, (y * context)[..., None]), dim=-1)
    keys = context[:, None, :] / context.sum(1).clamp(min=1)[:, None, None]
    for layer in range(w_kq.shape[-3]):
        scores = z @ w_kq[..., layer, :, :] @ z.transpose(1, 2) * keys
        z = z + scores @ (z @ w_pv[..., layer, :, :])
    return z[..., -1]


class LinearAttentionICL(nn.Module):
    """A linear-attention transformer for in-context regression (`n_layers` layers, no MLP)."""

    def __init__(self, dim: int, n_layers: int = 1, init_std: float = 0.1, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        size = (n_layers, dim + 1, dim + 1)
        self.w_kq = nn.Parameter(torch.randn(size, generator=g) * init_std)
        self.w_pv = nn.Parameter(torch.randn(size, generator=g) * init_std)

    def predict(self, x: torch.Tensor, y: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor] | None = None):
        """The query's prediction `[B]` from the n demonstrations before it (`x [B, n+1, d]`, `y [B, n+1]`)."""
        context = torch.ones_like(y)
        context[:, -1] = 0
        w_kq, w_pv = weights if weights is not None else (self.w_kq, self.w_pv)
        return linear_attention(w_kq, w_pv, x, y, context)[:, -1]


def pretrain(model: LinearAttentionICL, prompts: RegressionPrompts, *, steps: int, n_range: tuple[int, int],
             batch_size: int = 256, lr: float = 1e-2, seed: int = 0) -> list[float]:
    """Adam (cosine schedule) on the query's squared error, n drawn per batch from `n_range`; returns the losses."""
    optimizer = make_optimizer(model, lr, 0.0)
    losses = []
    for step in range(steps):
        set_lr(optimizer, lr_at(step, base_lr=lr, warmup=0, total=steps, min_ratio=0.01))
        g = step_generator(seed, step)
        n = int(torch.randint(n_range[0], n_range[1] + 1, (1,), generator=g))
        x, y = prompts.sample(batch_size, n, g)
        loss = (model.predict(x, y) - y[:, -1]).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def fold_loss(w_kq, w_pv, x: torch.Tensor, y: torch.Tensor, folds: int) -> torch.Tensor:
    """Per-prompt `[B]` mean squared error of predicting each fold of the demonstrations
    (`x [B, n, d]`, `y [B, n]`, no query) from the other folds."""
    B, n = y.shape
    folds = max(1, min(folds, n))
    fold_of = torch.arange(n) % folds
    targets = (fold_of[None, :] == torch.arange(folds)[:, None]).to(y.dtype)  # [F, n]
    rep = lambda t: t.repeat_interleave(folds, 0)
    context = (1 - targets).repeat(B, 1)
    w = [t if t.dim() == 3 else rep(t) for t in (w_kq, w_pv)]
    pred = linear_attention(*w, rep(x), rep(y), context)
    err = ((pred - rep(y)).pow(2) * (1 - context)).sum(1) / (1 - context).sum(1)
    return err.view(B, folds).mean(1)


def test_time_train(model: LinearAttentionICL, x: torch.Tensor, y: torch.Tensor, *, steps: int = 1, lr: float,
                    folds: int = 4, max_norm: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt weights `[B, L, D, D]` after `steps` gradient steps on `fold_loss` of the
    demonstrations (`x [B, n+1, d]` with the query last; the query is never used).

    Each prompt's gradient is clipped to norm `max_norm`: the loss is a high-degree
    polynomial in the tokens, so a few prompts with large inputs would otherwise
    take steps orders of magnitude larger than the rest.
    """
    B = x.shape[0]
    w = [p.detach().expand(B, *p.shape).clone() for p in (model.w_kq, model.w_pv)]
    for _ in range(steps):
        w = [t.requires_grad_(True) for t in w]
        loss = fold_loss(*w, x[:, :-1], y[:, :-1], folds).sum()  # a sum: each prompt gets its own gradient
        grads = torch.autograd.grad(loss, w)
        norm = torch.sqrt(sum(g.pow(2).flatten(1).sum(1) for g in grads))
        scale = (max_norm / norm.clamp(min=1e-12)).clamp(max=1.0).view(B, 1, 1, 1)
        w = [(t - lr * scale * g).detach() for t, g in zip(w, grads)]
    return tuple(w)
