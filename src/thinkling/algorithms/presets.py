"""The RL knobs each algorithm sets: GRPO variants are presets of the same loss.

A recipe names a preset in `rl.algorithm` and may override any knob. Every preset
has beta = 0, so no reference model is loaded unless a recipe asks for a KL term
(DeepSeekMath's GRPO used beta = 0.04 with k3; set `rl.beta` to get it back).
"""

from __future__ import annotations

from typing import Any, Mapping

from thinkling.algorithms.advantages import ADVANTAGE_ESTIMATORS
from thinkling.algorithms.losses import AGGREGATIONS, KL_ESTIMATORS
from thinkling.errors import ThinklingError

_GRPO = {
    "advantage": "grpo",
    "eps_low": 0.2,
    "eps_high": 0.2,
    "beta": 0.0,
    "kl_estimator": "k3",
    "aggregation": "seq-mean-token-mean",
    "dynamic_sampling": False,
    "entropy_coef": 0.0,
}

PRESETS: dict[str, dict[str, Any]] = {
    "grpo": _GRPO,
    # Dr.GRPO: no std division, no per-sequence length normalisation.
    "dr_grpo": {**_GRPO, "advantage": "dr_grpo", "aggregation": "seq-mean-token-sum-norm"},
    # DAPO: clip-higher leaves room for unlikely tokens to grow; token-level loss; drop no-signal groups.
    "dapo": {**_GRPO, "eps_high": 0.28, "aggregation": "token-mean", "dynamic_sampling": True},
    # CLGRPO clip-low (interpretation, METHODS.md §1): a narrower upper trust region for small models.
    "clgrpo": {**_GRPO, "eps_high": 0.1, "aggregation": "token-mean"},
}

RL_KNOBS = tuple(_GRPO)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_rl_knobs(knobs: Mapping[str, Any]) -> None:
    """Check the RL knobs present in `knobs`; other keys are left to the caller."""
    for key in ("eps_low", "eps_high", "beta", "entropy_coef"):
        if key in knobs and not _is_number(knobs[key]):
            raise ThinklingError(f"config key 'rl.{key}': expected a number, got {knobs[key]!r}")
    for key in ("eps_low", "eps_high", "beta"):
        if key in knobs and knobs[key] < 0:
            raise ThinklingError(f"config key 'rl.{key}': must be >= 0, got {knobs[key]}")
    for key, known in (("advantage", ADVANTAGE_ESTIMATORS), ("aggregation", AGGREGATIONS),
                       ("kl_estimator", KL_ESTIMATORS)):
        if key in knobs and knobs[key] not in known:
            raise ThinklingError(f"config key 'rl.{key}': unknown '{knobs[key]}'; known: {', '.join(known)}")
    if "dynamic_sampling" in knobs and not isinstance(knobs["dynamic_sampling"], bool):
        value = knobs["dynamic_sampling"]
        raise ThinklingError(f"config key 'rl.dynamic_sampling': expected true/false, got {value!r}")


def rl_knobs(algorithm: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The preset `algorithm` with the non-None `overrides` applied, validated."""
    if algorithm not in PRESETS:
        raise ThinklingError(f"config key 'rl.algorithm': unknown '{algorithm}'; known: {', '.join(PRESETS)}")
    knobs = dict(PRESETS[algorithm])
    for key, value in (overrides or {}).items():
        if key not in knobs:
            raise ThinklingError(f"config key 'rl.{key}': not an RL knob (known: {', '.join(RL_KNOBS)})")
        if value is not None:
            knobs[key] = value
    validate_rl_knobs(knobs)
    return knobs
