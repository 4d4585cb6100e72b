"""Per-token policy loss, KL estimators, entropy and loss aggregation.

All tensors are `[B, T]` over completion positions; `mask` marks the tokens the
policy sampled (the only ones trained on). Positions outside the mask may hold
anything: every input is replaced by a constant there with `torch.where` before
any arithmetic, so they receive exactly zero gradient and cannot turn the loss
into inf or nan.
"""

from __future__ import annotations

from typing import Callable

import torch

from thinkling.errors import ThinklingError

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return logp - ref_logp


def _k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    return 0.5 * (logp - ref_logp) ** 2


def _k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    d = ref_logp - logp
    return torch.exp(d) - d - 1


KL_ESTIMATORS = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from the sampled tokens' log-probs.

    k1 = log π_θ − log π_ref (unbiased, can be negative);
    k2 = ½(log π_θ − log π_ref)²;
    k3 = exp(log π_ref − log π_θ) − (log π_ref − log π_θ) − 1 (unbiased and ≥ 0).
    """
    if estimator not in KL_ESTIMATORS:
        raise ThinklingError(f"unknown kl_estimator '{estimator}'; known: {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logp, ref_logp)


def agg_count(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The number of loss tokens (`token-mean`) or of sequences with at least one (the sequence
    means): what `agg_loss` divides by, before the floor of 1. Counts of shards add up (data-parallel)."""
    mask = mask != 0
    return mask.sum() if mode == "token-mean" else (mask.sum(dim=-1) > 0).sum()


def agg_denominator(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """What `agg_loss` divides by: `agg_count`, at least 1. Micro-batches of a batch pass the whole
    batch's value to `agg_loss` so that their losses add up to the batch's loss."""
    return agg_count(mask, mode).clamp(min=1)


def agg_loss(loss_mat: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int | None = None,
             denominator: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a per-token loss `[B, T]` to a scalar over the masked tokens.

    - `token-mean` (DAPO): every loss token weighs the same, long or short sequence.
    - `seq-mean-token-mean` (GRPO): mean per sequence, then mean over sequences.
    - `seq-mean-token-sum-norm` (Dr.GRPO): per-sequence sum / `max_len` (a constant,
      so no length bias), then mean over sequences.
    Sequence means run over sequences with at least one loss token; a batch
    without any loss token gives 0. `denominator` replaces `agg_denominator(mask, mode)`.
    """
    if mode not in AGGREGATIONS:
        raise ThinklingError(f"unknown aggregation '{mode}'; known: {', '.join(AGGREGATIONS)}")
    mask = mask != 0
    loss_mat = torch.where(mask, loss_mat, 0.0)
    if denominator is None:
        denominator = agg_denominator(mask, mode)
    if mode == "token-mean":
        return loss_mat.sum() / denominator
    tokens = mask.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        per_seq = loss_mat.sum(dim=-1) / tokens.clamp(min=1)
    else:
        if max_len is None or max_len <= 0:
            raise ThinklingError("aggregation 'seq-mean-token-sum-norm' needs max_len > 0 (the max completion length)")
        per_seq = loss_mat.sum(dim=-1) / max_len
    return per_seq.sum() / denominator


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    return (torch.where(mask, x.detach(), 0.0).sum() / mask.sum().clamp(min=1)).item()


PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]

POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str):
    """Decorator: make a per-token surrogate selectable by `name` (`rl.loss`).

    A surrogate takes `(logp, old_logp, advantages [B, 1], mask, *, eps_low, eps_high)`, with
    every input already a constant outside the mask, and returns the per-token loss `[B, T]`
    and its stats. `policy_loss` adds the KL and entropy terms and aggregates.
    """

    def deco(fn: PolicyLossFn) -> PolicyLossFn:
        POLICY_LOSSES[name] = fn
        return fn

    return deco


@register_policy_loss("clip")
def clipped_surrogate(logp, old_logp, adv, mask, *, eps_low: float, eps_high: float):
    """PPO's clipped surrogate with separate lower / upper clip: −min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A).

    Stats: `clip_frac` (tokens where the clipped term won and differs from the unclipped
    one), split into `clip_frac_low` (ρ < 1−ε_low, A < 0) and `clip_frac_high`
    (ρ > 1+ε_high, A > 0); `ratio_mean`.
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    clip_active = mask & (clipped > unclipped)
    stats = {
        "clip_frac": _masked_mean(clip_active.float(), mask),
        "clip_frac_low": _masked_mean((clip_active & (ratio < 1 - eps_low)).float(), mask),
        "clip_frac_high": _masked_mean((clip_active & (ratio > 1 + eps_high)).float(), mask),
        "ratio_mean": _masked_mean(ratio, mask),
    }
    return torch.maximum(unclipped, clipped), stats


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
    aggregation: str,
    loss: str = "clip",
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    max_len: int | None = None,
    token_weights: torch.Tensor | None = None,
    denominator: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The surrogate `loss` (default: the clipped one) plus optional KL and entropy terms, aggregated.

    Per token: ℓ_t = surrogate_t + β·KL_t − entropy_coef·H_t, then `agg_loss(ℓ, mask, aggregation, max_len)`.
    `advantages` is `[B]` (one value per sequence); `old_logp`, `ref_logp` and the
    advantages are treated as constants. `ref_logp` is only needed when beta > 0;
    when given, its KL is reported in the stats even at beta = 0. `token_weights` (constants,
    e.g. truncated importance weights for off-policy samples) multiply the surrogate per token.

    Stats (floats, token means over the mask): the surrogate's, `kl_mean` when ref_logp is
    given, `entropy_mean` when entropy is given. `denominator`: see `agg_loss`
    (micro-batches).
    """
    if loss not in POLICY_LOSSES:
        raise ThinklingError(f"unknown policy loss '{loss}'; known: {', '.join(POLICY_LOSSES)}")
    if beta > 0 and ref_logp is None:
        raise ThinklingError("beta > 0 needs ref_logp (log-probs of a reference policy)")
    if entropy_coef != 0 and entropy is None:
        raise ThinklingError("entropy_coef != 0 needs the per-token entropy")
    mask = mask != 0
    logp = torch.where(mask, logp, 0.0)
    old_logp = torch.where(mask, old_logp.detach(), 0.0)
    adv = advantages.detach().reshape(-1, 1)
    loss_mat, stats = POLICY_LOSSES[loss](logp, old_logp, adv, mask, eps_low=eps_low, eps_high=eps_high)
    if token_weights is not None:
        loss_mat = loss_mat * torch.where(mask, token_weights.detach(), 0.0)
    if ref_logp is not None:
        kl = kl_penalty(logp, torch.where(mask, ref_logp.detach(), 0.0), kl_estimator)
        stats["kl_mean"] = _masked_mean(kl, mask)
        if beta > 0:
            loss_mat = loss_mat + beta * kl
    if entropy is not None:
        entropy = torch.where(mask, entropy, 0.0)
        stats["entropy_mean"] = _masked_mean(entropy, mask)
        if entropy_coef != 0:
            loss_mat = loss_mat - entropy_coef * entropy
    return agg_loss(loss_mat, mask, aggregation, max_len, denominator), stats


PREFERENCE_LOSSES = ("sigmoid", "ipo")


def dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    *,
    beta: float,
    loss: str = "sigmoid",
    label_smoothing: float = 0.0,
    denominator: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO's loss over `[P]` preference pairs, from each completion's log-prob (a sum over its
    tokens, or a mean for IPO) under the policy and the frozen reference.

    With the margin h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)):
    - `sigmoid` (DPO): −(1−ε)·log σ(β·h) − ε·log σ(−β·h), ε = `label_smoothing` (conservative DPO,
      for pairs whose label may be wrong; 0 = plain DPO);
    - `ipo`: (h − 1/(2β))², which stops pushing once the margin reaches 1/(2β) instead of driving
      it to infinity on pairs it already separates.
    The loss is the sum over pairs divided by `denominator` (default: the number of pairs, so
    micro-batches of a batch pass the whole batch's count and add up to its mean). Reference
    log-probs are constants. Stats, means over pairs (TRL's names): `rewards/chosen` and
    `rewards/rejected` (the implicit rewards β·(log π − log π_ref)), `rewards/margins`,
    `rewards/accuracies` (share of pairs whose chosen reward is higher).
    """
    if loss not in PREFERENCE_LOSSES:
        raise ThinklingError(f"unknown preference loss '{loss}'; known: {', '.join(PREFERENCE_LOSSES)}")
    if beta <= 0:
        raise ThinklingError(f"DPO's beta must be > 0, got {beta}")
    chosen_ratio = chosen_logp - ref_chosen_logp.detach()
    rejected_ratio = rejected_logp - ref_rejected_logp.detach()
    margin = chosen_ratio - rejected_ratio
    if loss == "sigmoid":
        per_pair = (-(1 - label_smoothing) * torch.nn.functional.logsigmoid(beta * margin)
                    - label_smoothing * torch.nn.functional.logsigmoid(-beta * margin))
    else:
        per_pair = (margin - 1 / (2 * beta)) ** 2
    n = per_pair.numel()
    total = per_pair.sum() / (max(n, 1) if denominator is None else denominator)
    chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    mean = (lambda x: float(x.float().mean())) if n else (lambda x: 0.0)
    stats = {"rewards/chosen": mean(chosen_reward), "rewards/rejected": mean(rejected_reward),
             "rewards/margins": mean(chosen_reward - rejected_reward),
             "rewards/accuracies": mean((chosen_reward > rejected_reward).float())}
    return total, stats
