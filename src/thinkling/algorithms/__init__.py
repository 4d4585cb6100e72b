"""The maths of GRPO-family RL (advantage estimators, the clipped policy loss, presets) and DPO's loss."""

from thinkling.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    group_has_signal,
    register_advantage,
)
from thinkling.algorithms.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    PREFERENCE_LOSSES,
    agg_count,
    agg_denominator,
    agg_loss,
    dpo_loss,
    kl_penalty,
    policy_loss,
    register_policy_loss,
)
from thinkling.algorithms.presets import PRESETS, RL_KNOBS, Knobs, rl_knobs
from thinkling.models.logprobs import entropy_from_logits  # the entropy bonus's input

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "Knobs",
    "POLICY_LOSSES",
    "PREFERENCE_LOSSES",
    "PRESETS",
    "RL_KNOBS",
    "agg_count",
    "agg_denominator",
    "agg_loss",
    "compute_advantages",
    "dpo_loss",
    "entropy_from_logits",
    "group_has_signal",
    "kl_penalty",
    "policy_loss",
    "register_advantage",
    "register_policy_loss",
    "rl_knobs",
]
