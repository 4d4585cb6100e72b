"""Advantage estimators: one scalar per completion, computed within its group.

Every estimator takes rewards `[n_groups, G]` and returns advantages of the same
shape; the policy loss gives completion i's advantage to each of its tokens.
Estimators are registered by name so a recipe selects one with a string.
"""

from __future__ import annotations

from typing import Callable

import torch

from thinkling.errors import ThinklingError

AdvantageFn = Callable[[torch.Tensor], torch.Tensor]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}

# Keeps the GRPO division finite when a group's rewards are all equal.
STD_EPS = 1e-6


def register_advantage(name: str):
    """Decorator: make an estimator selectable by `name`."""

    def deco(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return deco


@register_advantage("grpo")
def grpo_advantage(rewards: torch.Tensor) -> torch.Tensor:
    """(r − mean) / (std + 1e-6), std being the population std (divide by G).

    The population std is defined for any G; with binary rewards and a group
    success rate p, successes get sqrt((1−p)/p) and failures −sqrt(p/(1−p)).
    TRL and verl divide by the Bessel-corrected std instead, which makes their
    advantages smaller by the factor sqrt((G−1)/G).
    """
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=False, keepdim=True)
    return (rewards - mean) / (std + STD_EPS)


@register_advantage("dr_grpo")
def dr_grpo_advantage(rewards: torch.Tensor) -> torch.Tensor:
    """r − mean: Dr.GRPO drops the std division, which up-weights near-solved groups."""
    return rewards - rewards.mean(dim=1, keepdim=True)


@register_advantage("rloo")
def rloo_advantage(rewards: torch.Tensor) -> torch.Tensor:
    """r_i − mean of the other G−1 rewards: a baseline independent of r_i itself."""
    g = rewards.shape[1]
    if g < 2:
        raise ThinklingError("advantage 'rloo' needs a group size of at least 2")
    others = (rewards.sum(dim=1, keepdim=True) - rewards) / (g - 1)
    return rewards - others


def compute_advantages(name: str, rewards: torch.Tensor) -> torch.Tensor:
    """Advantages `[n_groups, G]` from rewards `[n_groups, G]` with the estimator `name`."""
    if name not in ADVANTAGE_ESTIMATORS:
        raise ThinklingError(f"unknown advantage '{name}'; known: {', '.join(sorted(ADVANTAGE_ESTIMATORS))}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [n_groups, G], got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    return ADVANTAGE_ESTIMATORS[name](rewards)


def group_has_signal(rewards: torch.Tensor) -> torch.Tensor:
    """bool `[n_groups]`: the group's rewards are not all equal (DAPO dynamic sampling keeps these).

    A group whose rewards are all equal has zero advantage under every estimator
    here, so it only dilutes the batch.
    """
    return (rewards != rewards[:, :1]).any(dim=1)
