"""The maths of GRPO-family RL: advantage estimators, the clipped policy loss, presets."""

from thinkling.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    group_has_signal,
    register_advantage,
)
from thinkling.algorithms.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    agg_denominator,
    agg_loss,
    entropy_from_logits,
    kl_penalty,
    policy_loss,
)
from thinkling.algorithms.presets import PRESETS, RL_KNOBS, rl_knobs, validate_rl_knobs

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "PRESETS",
    "RL_KNOBS",
    "agg_denominator",
    "agg_loss",
    "compute_advantages",
    "entropy_from_logits",
    "group_has_signal",
    "kl_penalty",
    "policy_loss",
    "register_advantage",
    "rl_knobs",
    "validate_rl_knobs",
]
