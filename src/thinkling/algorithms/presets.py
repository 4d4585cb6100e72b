"""The RL knobs each algorithm sets: GRPO variants are presets of the same loss.

A recipe names a preset in `rl.algorithm` and may override any knob. Every preset
has beta = 0, so no reference model is loaded unless a recipe asks for a KL term
(DeepSeekMath's GRPO used beta = 0.04 with k3; set `rl.beta` to get it back).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from thinkling.algorithms.advantages import ADVANTAGE_ESTIMATORS
from thinkling.algorithms.losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from thinkling.errors import ThinklingError


@dataclass(frozen=True)
class Knobs:
    """What distinguishes one GRPO-family algorithm from another (defaults: GRPO)."""

    advantage: str = "grpo"  # a name in ADVANTAGE_ESTIMATORS
    loss: str = "clip"  # a name in POLICY_LOSSES
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0  # KL to a frozen reference; 0 never builds one
    kl_estimator: str = "k3"
    aggregation: str = "seq-mean-token-mean"
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal
    entropy_coef: float = 0.0

    def validate(self) -> Knobs:
        for key in ("eps_low", "eps_high", "beta", "entropy_coef"):
            value = getattr(self, key)
            if not _is_number(value):
                raise ThinklingError(f"config key 'rl.{key}': expected a number, got {value!r}")
        for key in ("eps_low", "eps_high", "beta", "entropy_coef"):
            if getattr(self, key) < 0:
                raise ThinklingError(f"config key 'rl.{key}': must be >= 0, got {getattr(self, key)}")
        for key, known in (("advantage", ADVANTAGE_ESTIMATORS), ("loss", POLICY_LOSSES),
                           ("aggregation", AGGREGATIONS), ("kl_estimator", KL_ESTIMATORS)):
            if getattr(self, key) not in known:
                raise ThinklingError(f"config key 'rl.{key}': unknown '{getattr(self, key)}'; known: {', '.join(known)}")
        if not isinstance(self.dynamic_sampling, bool):
            raise ThinklingError(f"config key 'rl.dynamic_sampling': expected true/false, got {self.dynamic_sampling!r}")
        return self


_GRPO = Knobs()

PRESETS: dict[str, Knobs] = {
    "grpo": _GRPO,
    # Dr.GRPO: no std division, no per-sequence length normalisation.
    "dr_grpo": replace(_GRPO, advantage="dr_grpo", aggregation="seq-mean-token-sum-norm"),
    # DAPO: clip-higher leaves room for unlikely tokens to grow; token-level loss; drop no-signal groups.
    "dapo": replace(_GRPO, eps_high=0.28, aggregation="token-mean", dynamic_sampling=True),
    # CLGRPO clip-low (our reading of the paper, docs/methods.md#clgrpo-clip-low): a narrower upper trust region for small models.
    "clgrpo": replace(_GRPO, eps_high=0.1, aggregation="token-mean"),
}

RL_KNOBS = tuple(f.name for f in fields(Knobs))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def rl_knobs(algorithm: str, overrides: Mapping[str, Any] | None = None) -> Knobs:
    """The preset `algorithm` with the non-None `overrides` applied, validated."""
    if algorithm not in PRESETS:
        raise ThinklingError(f"config key 'rl.algorithm': unknown '{algorithm}'; known: {', '.join(PRESETS)}")
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(RL_KNOBS))
    if unknown:
        raise ThinklingError(f"config key 'rl.{unknown[0]}': not an RL knob (known: {', '.join(RL_KNOBS)})")
    return replace(PRESETS[algorithm], **{k: v for k, v in overrides.items() if v is not None}).validate()
