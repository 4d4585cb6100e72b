"""Rewards: pure functions from verdicts and lengths to scalars (accuracy, format, TLDR length)."""

from thinkling.rewards.compose import LengthSpec, RewardBreakdown, RewardSpec, compute_rewards
from thinkling.rewards.length import LENGTH_LEVELS, sample_levels, tag_prompt, tldr_length_factor

__all__ = [
    "LENGTH_LEVELS",
    "LengthSpec",
    "RewardBreakdown",
    "RewardSpec",
    "compute_rewards",
    "sample_levels",
    "tag_prompt",
    "tldr_length_factor",
]
