"""The scalar reward of a completion: weighted accuracy and format, optionally length-regularised (TLDR).

    r = w_acc·r_acc·(1 − λ·clip((L − B_ℓ)/B_ℓ, 0, 1)) + w_fmt·r_format   (TLDR on)
    r = w_acc·r_acc + w_fmt·r_format                                    (TLDR off)

with r_acc, r_format ∈ {0, 1}, L the completion length in tokens and B_ℓ the
budget of the prompt's length level ℓ. The spec is read from the recipe's
`rl.rewards` mapping: `{accuracy: w_acc, format: w_fmt, length: {lam, budgets: {short, medium, long}}}`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from thinkling.errors import ThinklingError
from thinkling.rewards.length import tldr_length_factor
from thinkling.rollout.prompts import LENGTH_LEVELS

_WHERE = "rl.rewards"


def _key(key: str) -> str:
    return f"{_WHERE}.{key}" if key else _WHERE


def _number(value, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ThinklingError(f"config key '{_key(key)}': expected a finite number, got {value!r}")
    return float(value)


def _mapping(value, key: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ThinklingError(f"config key '{_key(key)}': expected a mapping, got {value!r}")
    return value


def _reject_unknown(data: Mapping, allowed: tuple[str, ...], prefix: str) -> None:
    for key in data:
        if key not in allowed:
            raise ThinklingError(f"unknown config key '{_key(prefix + key)}' (allowed: {', '.join(allowed)})")


@dataclass(frozen=True)
class LengthSpec:
    """TLDR: a token budget per length level and the penalty strength λ ∈ [0, 1]."""

    budgets: dict[str, float]
    lam: float = 0.5

    def __post_init__(self):
        budgets = _mapping(self.budgets, "length.budgets")
        if not budgets:
            raise ThinklingError(f"config key '{_WHERE}.length.budgets': needs at least one level")
        for level, budget in budgets.items():
            if level not in LENGTH_LEVELS:
                raise ThinklingError(f"config key '{_WHERE}.length.budgets.{level}': unknown length level "
                                     f"(known: {', '.join(LENGTH_LEVELS)})")
            if _number(budget, f"length.budgets.{level}") <= 0:
                raise ThinklingError(f"config key '{_WHERE}.length.budgets.{level}': must be > 0, got {budget}")
        if not 0 <= _number(self.lam, "length.lam") <= 1:
            raise ThinklingError(f"config key '{_WHERE}.length.lam': must be in [0, 1], got {self.lam}")

    @property
    def levels(self) -> tuple[str, ...]:
        """The configured levels in short → long order (the ones training samples from)."""
        return tuple(level for level in LENGTH_LEVELS if level in self.budgets)


@dataclass(frozen=True)
class RewardSpec:
    accuracy: float = 1.0
    format: float = 0.0
    length: LengthSpec | None = None

    def __post_init__(self):
        _number(self.accuracy, "accuracy")
        _number(self.format, "format")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RewardSpec:
        data = _mapping(data or {}, "")
        _reject_unknown(data, ("accuracy", "format", "length"), "")
        length = data.get("length")
        if length is not None:
            length = _mapping(length, "length")
            _reject_unknown(length, ("lam", "budgets"), "length.")
            if "budgets" not in length:
                raise ThinklingError(f"config key '{_WHERE}.length.budgets': required when length is set")
            length = LengthSpec(**length)
        return cls(**{**data, "length": length})


@dataclass
class RewardBreakdown:
    """Per-completion components `[N]`, for metrics."""

    accuracy: torch.Tensor
    format: torch.Tensor
    length_factor: torch.Tensor


def compute_rewards(spec: RewardSpec, correct: list[bool], format_ok: list[bool],
                    lengths: list[int] | None = None,
                    levels: list[str | None] | None = None) -> tuple[torch.Tensor, RewardBreakdown]:
    """Rewards `[N]` and their components; `lengths` and `levels` are needed only with TLDR on."""
    n = len(correct)
    if len(format_ok) != n:
        raise ValueError(f"correct has {n} entries, format_ok {len(format_ok)}")
    acc = torch.tensor([float(c) for c in correct])
    fmt = torch.tensor([float(f) for f in format_ok])
    factor = torch.ones(n)
    if spec.length is not None:
        if lengths is None or levels is None or len(lengths) != n or len(levels) != n:
            raise ValueError("TLDR rewards need one length and one level per completion")
        for i, (length, level) in enumerate(zip(lengths, levels)):
            if level not in spec.length.budgets:
                raise ThinklingError(f"length level {level!r} has no budget in '{_WHERE}.length.budgets' "
                                     f"(configured: {', '.join(spec.length.levels)})")
            factor[i] = tldr_length_factor(length, spec.length.budgets[level], spec.length.lam)
    total = spec.accuracy * acc * factor + spec.format * fmt
    return total, RewardBreakdown(acc, fmt, factor)
