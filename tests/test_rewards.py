"""Reward composition and TLDR length control against hand-computed values."""

import pytest
import torch

from thinkling.errors import ThinklingError
from thinkling.rewards import (
    LengthSpec,
    RewardSpec,
    compute_rewards,
    tldr_length_factor,
)
from thinkling.rollout.prompts import LENGTH_LEVELS, sample_levels, tag_prompt


def test_tldr_length_factor_by_hand():
    # budget 10, lambda 0.5
    assert tldr_length_factor(8, 10, 0.5) == 1.0  # under budget
    assert tldr_length_factor(10, 10, 0.5) == 1.0  # at budget
    assert tldr_length_factor(15, 10, 0.5) == pytest.approx(0.75)  # (15-10)/10 = 0.5 -> 1 - 0.25
    assert tldr_length_factor(20, 10, 0.5) == pytest.approx(0.5)  # 2B: full penalty
    assert tldr_length_factor(30, 10, 0.5) == pytest.approx(0.5)  # beyond 2B: capped
    assert tldr_length_factor(30, 10, 1.0) == 0.0
    assert tldr_length_factor(30, 10, 0.0) == 1.0


def test_compute_rewards_tldr_by_hand():
    spec = RewardSpec.from_dict({"accuracy": 1.0, "format": 0.5,
                                 "length": {"lam": 0.5, "budgets": {"short": 10, "medium": 20, "long": 40}}})
    total, parts = compute_rewards(
        spec,
        correct=[True, True, True, False, True, True],
        format_ok=[True, True, True, True, False, True],
        lengths=[8, 15, 30, 5, 60, 30],
        levels=["short", "short", "short", "short", "long", "medium"],
    )
    expected = [
        1.0 + 0.5,  # 8 <= 10
        0.75 + 0.5,  # 15: half over budget -> 1 - 0.5*0.5
        0.5 + 0.5,  # 30 > 2*10: capped at 1 - 0.5
        0.0 + 0.5,  # wrong: only the format reward, length does not matter
        0.75 + 0.0,  # long budget 40: (60-40)/40 = 0.5 -> 0.75, format broken
        0.75 + 0.5,  # medium budget 20: (30-20)/20 = 0.5 -> 0.75
    ]
    assert torch.allclose(total, torch.tensor(expected))
    assert parts.accuracy.tolist() == [1, 1, 1, 0, 1, 1]
    assert parts.format.tolist() == [1, 1, 1, 1, 0, 1]
    assert torch.allclose(parts.length_factor, torch.tensor([1.0, 0.75, 0.5, 1.0, 0.75, 0.75]))


def test_compute_rewards_without_tldr():
    spec = RewardSpec.from_dict({"accuracy": 2.0, "format": 0.25})
    total, parts = compute_rewards(spec, [True, False, True], [True, True, False])
    assert total.tolist() == [2.25, 0.25, 2.0]
    assert parts.length_factor.tolist() == [1.0, 1.0, 1.0]
    # format-only reward (CLGRPO stage 2)
    total, _ = compute_rewards(RewardSpec(accuracy=0.0, format=1.0), [True, False], [False, True])
    assert total.tolist() == [0.0, 1.0]


def test_default_spec():
    spec = RewardSpec.from_dict(None)
    assert (spec.accuracy, spec.format, spec.length) == (1.0, 0.0, None)


def test_tldr_needs_levels_with_budgets():
    spec = RewardSpec(length=LengthSpec(budgets={"short": 10, "long": 50}))
    assert spec.length.levels == ("short", "long") and spec.length.lam == 0.5
    with pytest.raises(ThinklingError, match="'medium'"):
        compute_rewards(spec, [True], [True], [3], ["medium"])
    with pytest.raises(ThinklingError, match="None"):
        compute_rewards(spec, [True], [True], [3], [None])
    with pytest.raises(ValueError):
        compute_rewards(spec, [True], [True])


@pytest.mark.parametrize("data, key", [
    ({"length": {"lam": 1.5, "budgets": {"short": 10}}}, "rl.rewards.length.lam"),
    ({"length": {"lam": -0.1, "budgets": {"short": 10}}}, "rl.rewards.length.lam"),
    ({"length": {"budgets": {"tiny": 10}}}, "rl.rewards.length.budgets.tiny"),
    ({"length": {"budgets": {"short": 0}}}, "rl.rewards.length.budgets.short"),
    ({"length": {"budgets": {"long": -5}}}, "rl.rewards.length.budgets.long"),
    ({"length": {"budgets": {}}}, "rl.rewards.length.budgets"),
    ({"length": {"lam": 0.5}}, "rl.rewards.length.budgets"),
    ({"length": {"lam": 0.5, "budget": {"short": 3}}}, "rl.rewards.length.budget"),
    ({"accuracy": "high"}, "rl.rewards.accuracy"),
    ({"acuracy": 1.0}, "rl.rewards.acuracy"),
    ({"length": [10, 20]}, "rl.rewards.length"),
])
def test_spec_validation_names_the_key(data, key):
    with pytest.raises(ThinklingError, match=key.replace(".", r"\.")):
        RewardSpec.from_dict(data)


def test_prompt_tag_and_level_sampling():
    assert LENGTH_LEVELS == ("short", "medium", "long")
    assert tag_prompt("3+4=?", "short") == "[short] 3+4=?"
    with pytest.raises(ThinklingError, match="'brief'"):
        tag_prompt("3+4=?", "brief")
    levels = sample_levels(300, seed=7)
    assert levels == sample_levels(300, seed=7)
    assert levels != sample_levels(300, seed=8)
    assert set(levels) == set(LENGTH_LEVELS)
    assert set(sample_levels(50, seed=0, levels=("short", "long"))) == {"short", "long"}
    with pytest.raises(ThinklingError):
        sample_levels(3, seed=0, levels=("short", "huge"))
