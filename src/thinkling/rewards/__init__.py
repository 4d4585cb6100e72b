"""Rewards: pure functions from verdicts and lengths to scalars (accuracy, format, TLDR length)."""

from thinkling.rewards.compose import (
    LengthSpec,
    RewardBreakdown,
    RewardSpec,
    compute_rewards,
)
from thinkling.rewards.length import tldr_length_factor

__all__ = ["LengthSpec", "RewardBreakdown", "RewardSpec", "compute_rewards", "tldr_length_factor"]
