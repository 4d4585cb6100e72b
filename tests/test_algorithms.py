"""Advantage estimators, the clipped policy loss, KL, aggregation and presets against hand-computed numbers."""

import dataclasses
import math

import pytest
import torch

from thinkling.algorithms import (
    ADVANTAGE_ESTIMATORS,
    AGGREGATIONS,
    PRESETS,
    RL_KNOBS,
    agg_loss,
    compute_advantages,
    entropy_from_logits,
    group_has_signal,
    kl_penalty,
    policy_loss,
    rl_knobs,
)
from thinkling.errors import ThinklingError

SQRT2 = math.sqrt(2.0)

# ---------------------------------------------------------------- advantages


def test_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
    # mean 1/3, population std sqrt(2)/3 -> (2/3)/(sqrt(2)/3) = sqrt(2), (-1/3)/(sqrt(2)/3) = -1/sqrt(2)
    assert torch.allclose(compute_advantages("grpo", r),
                          torch.tensor([[SQRT2, -1 / SQRT2, -1 / SQRT2], [0.0, 0.0, 0.0]]), atol=1e-5)
    assert torch.allclose(compute_advantages("dr_grpo", r),
                          torch.tensor([[2 / 3, -1 / 3, -1 / 3], [0.0, 0.0, 0.0]]), atol=1e-7)
    # 1 - mean(0, 0) = 1; 0 - mean(1, 0) = -1/2
    assert torch.allclose(compute_advantages("rloo", r),
                          torch.tensor([[1.0, -0.5, -0.5], [0.0, 0.0, 0.0]]), atol=1e-7)


def test_grpo_std_is_population_std():
    # rewards (0, 1): mean 1/2, population std 1/2 (Bessel would give 0.7071) -> ±1
    a = compute_advantages("grpo", torch.tensor([[0.0, 1.0]]))
    assert torch.allclose(a, torch.tensor([[-1.0, 1.0]]), atol=1e-5)


def test_advantage_errors():
    with pytest.raises(ThinklingError, match="unknown advantage 'ppo'.*dr_grpo, grpo, rloo"):
        compute_advantages("ppo", torch.zeros(1, 2))
    with pytest.raises(ThinklingError, match="rloo"):
        compute_advantages("rloo", torch.zeros(3, 1))


def test_group_has_signal():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.25]])
    assert group_has_signal(r).tolist() == [False, False, True, True]


# ------------------------------------------------------- loss: hand-built batch
# One group, rewards (1, 0, 0); three completions of 2, 3 and 1 loss tokens.
# Ratios inside the clip range [0.8, 1.2], so every token's loss is -rho * A.
#   seq0: rho = 1.1, 1.1        sum 2.2   mean 1.1
#   seq1: rho = 1.0, 0.9, 0.95  sum 2.85  mean 0.95
#   seq2: rho = 1.05            sum 1.05  mean 1.05
# Advantages (a0, a1, a1) with a1 shared by seq1 and seq2 (both reward 0):
#   token-mean              = -(2.2*a0 + 3.9*a1) / 6
#   seq-mean-token-mean     = -(1.1*a0 + 2.0*a1) / 3
#   seq-mean-token-sum-norm = -(2.2*a0 + 3.9*a1) / 4 / 3        (max_len 4)
# grpo   (sqrt2, -1/sqrt2):  2.2*sqrt2 - 3.9/sqrt2 = 0.5/sqrt2 = 0.35355339
#                            1.1*sqrt2 - 2.0/sqrt2 = 0.2/sqrt2 = 0.14142136
# dr_grpo (2/3, -1/3):       (4.4 - 3.9)/3 = 1/6    and  (2.2 - 2.0)/3 = 1/15
# rloo   (1, -1/2):          2.2 - 1.95 = 0.25      and  1.1 - 1.0 = 0.1
EXPECTED = {
    ("grpo", "token-mean"): -0.35355339 / 6,
    ("grpo", "seq-mean-token-mean"): -0.14142136 / 3,
    ("grpo", "seq-mean-token-sum-norm"): -0.35355339 / 12,
    ("dr_grpo", "token-mean"): -1 / 36,
    ("dr_grpo", "seq-mean-token-mean"): -1 / 45,
    ("dr_grpo", "seq-mean-token-sum-norm"): -1 / 72,
    ("rloo", "token-mean"): -0.25 / 6,
    ("rloo", "seq-mean-token-mean"): -0.1 / 3,
    ("rloo", "seq-mean-token-sum-norm"): -0.25 / 12,
}


def _hand_batch():
    ratio = torch.tensor([[1.1, 1.1, 7.0], [1.0, 0.9, 0.95], [1.05, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    old = torch.full((3, 3), -2.0)
    return old + ratio.log(), old, mask


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_loss_by_hand(estimator, aggregation):
    logp, old, mask = _hand_batch()
    adv = compute_advantages(estimator, torch.tensor([[1.0, 0.0, 0.0]]))[0]
    loss, stats = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.2, aggregation=aggregation, max_len=4)
    assert loss.item() == pytest.approx(EXPECTED[(estimator, aggregation)], abs=1e-6)
    assert stats["clip_frac"] == 0.0
    assert stats["ratio_mean"] == pytest.approx((2.2 + 2.85 + 1.05) / 6, abs=1e-6)


def test_all_estimators_and_aggregations_covered():
    assert {k[0] for k in EXPECTED} == set(ADVANTAGE_ESTIMATORS)
    assert {k[1] for k in EXPECTED} == set(AGGREGATIONS)


def test_agg_loss_modes_by_hand():
    loss = torch.tensor([[1.0, 2.0, 99.0], [3.0, 99.0, 99.0], [99.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert agg_loss(loss, mask, "token-mean").item() == pytest.approx(6 / 3)
    # per-sequence means 1.5 and 3; the empty third row does not count
    assert agg_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(2.25)
    # sums 3 and 3, / 10, mean over 2 sequences
    assert agg_loss(loss, mask, "seq-mean-token-sum-norm", max_len=10).item() == pytest.approx(0.3)
    assert agg_loss(loss, torch.zeros(3, 3), "token-mean").item() == 0.0


def test_agg_loss_errors():
    with pytest.raises(ThinklingError, match="max_len"):
        agg_loss(torch.ones(1, 2), torch.ones(1, 2), "seq-mean-token-sum-norm")
    with pytest.raises(ThinklingError, match="unknown aggregation 'sum'"):
        agg_loss(torch.ones(1, 2), torch.ones(1, 2), "sum")


# -------------------------------------------- gradient: REINFORCE and the mask


def _reinforce_reference(logp, adv, mask, aggregation, max_len):
    """-A * logp aggregated by explicit loops, independent of agg_loss."""
    per_seq, tokens = [], 0
    total = 0.0
    for b in range(logp.shape[0]):
        terms = [-adv[b] * logp[b, t] for t in range(logp.shape[1]) if mask[b, t]]
        tokens += len(terms)
        total = total + sum(terms)
        if terms:
            per_seq.append(sum(terms) / (len(terms) if aggregation == "seq-mean-token-mean" else max_len))
    if aggregation == "token-mean":
        return total / tokens
    return sum(per_seq) / len(per_seq)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_ratio_one_gradient_is_reinforce(aggregation):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5, generator=g, requires_grad=True)
    tokens = torch.randint(0, 5, (3, 4), generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([0.7, -1.3, 0.4])

    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    loss, stats = policy_loss(logp, logp.detach(), adv, mask, eps_low=0.2, eps_high=0.28,
                              aggregation=aggregation, max_len=6)
    (grad,) = torch.autograd.grad(loss, logits)

    logp_ref = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    ref = _reinforce_reference(logp_ref, adv, mask, aggregation, max_len=6)
    (grad_ref,) = torch.autograd.grad(ref, logits)
    assert stats["ratio_mean"] == 1.0 and stats["clip_frac"] == 0.0
    assert torch.allclose(grad, grad_ref, atol=1e-7)
    # the value is the aggregated -A as well (ratio exactly 1)
    assert loss.item() == pytest.approx(_reinforce_reference(torch.ones(3, 4), adv, mask, aggregation, 6).item())


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_masked_tokens_get_exactly_zero_gradient(aggregation):
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float32)
    # garbage at masked positions: exp(logp - old) would overflow to inf there
    logp = torch.tensor([[-1.0, -2.0, 500.0, -1e4], [-0.5, 800.0, -3e3, 1e4]], requires_grad=True)
    old = torch.tensor([[-1.2, -1.8, -500.0, 0.0], [-0.4, -900.0, 3e3, -1e4]])
    ref = torch.tensor([[-1.1, -2.2, -1e4, 700.0], [-0.6, 1e4, -800.0, 900.0]])
    ent = torch.tensor([[1.0, 1.2, 1e5, -1e5], [0.9, 1e6, 3.0, 2.0]], requires_grad=True)
    loss, stats = policy_loss(logp, old, torch.tensor([1.0, -2.0]), mask, eps_low=0.2, eps_high=0.28,
                              aggregation=aggregation, ref_logp=ref, beta=0.1, kl_estimator="k3",
                              entropy=ent, entropy_coef=0.01, max_len=4)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(math.isfinite(v) for v in stats.values())
    off = mask == 0
    assert torch.equal(logp.grad[off], torch.zeros(int(off.sum())))
    assert torch.equal(ent.grad[off], torch.zeros(int(off.sum())))
    assert (logp.grad[~off] != 0).all() and (ent.grad[~off] != 0).all()


# ------------------------------------------------------------------ clipping


def _one_token(ratio, adv, eps_low, eps_high):
    old = torch.tensor([[-1.0]])
    logp = (old + math.log(ratio)).requires_grad_(True)
    loss, stats = policy_loss(logp, old, torch.tensor([adv]), torch.ones(1, 1), eps_low=eps_low,
                              eps_high=eps_high, aggregation="token-mean")
    loss.backward()
    return loss.item(), logp.grad.item(), stats


def test_clip_higher_upper_edge():
    # A > 0, rho 1.25: inside 1 + 0.28 (DAPO) -> -1.25 with gradient -rho*A; outside 1 + 0.2 -> -1.2, no gradient
    loss, grad, stats = _one_token(1.25, 1.0, eps_low=0.2, eps_high=0.28)
    assert loss == pytest.approx(-1.25) and grad == pytest.approx(-1.25) and stats["clip_frac"] == 0.0
    loss, grad, stats = _one_token(1.25, 1.0, eps_low=0.2, eps_high=0.2)
    assert loss == pytest.approx(-1.2) and grad == 0.0
    assert stats["clip_frac"] == 1.0 and stats["clip_frac_high"] == 1.0 and stats["clip_frac_low"] == 0.0


def test_clip_low_upper_edge():
    # CLGRPO eps_high 0.1: A = 2, rho 1.15 -> clipped at 1.1: -2.2, no gradient
    loss, grad, stats = _one_token(1.15, 2.0, eps_low=0.2, eps_high=0.1)
    assert loss == pytest.approx(-2.2) and grad == 0.0 and stats["clip_frac_high"] == 1.0
    # same token under eps_high 0.2 is not clipped: -2.3
    loss, grad, _ = _one_token(1.15, 2.0, eps_low=0.2, eps_high=0.2)
    assert loss == pytest.approx(-2.3) and grad == pytest.approx(-2.3)


def test_lower_edge():
    # A < 0, rho 0.5 < 1 - 0.2: min(-0.5, -0.8) = -0.8 -> loss 0.8, clipped, no gradient
    loss, grad, stats = _one_token(0.5, -1.0, eps_low=0.2, eps_high=0.1)
    assert loss == pytest.approx(0.8) and grad == 0.0
    assert stats["clip_frac_low"] == 1.0 and stats["clip_frac_high"] == 0.0
    # A > 0, rho 0.5: the unclipped term is the min -> loss -0.5, gradient flows, not counted as clipped
    loss, grad, stats = _one_token(0.5, 1.0, eps_low=0.2, eps_high=0.1)
    assert loss == pytest.approx(-0.5) and grad == pytest.approx(-0.5) and stats["clip_frac"] == 0.0
    # A < 0, rho 1.5 above the upper edge: unclipped -> loss 1.5 (pessimistic bound)
    loss, grad, stats = _one_token(1.5, -1.0, eps_low=0.2, eps_high=0.1)
    assert loss == pytest.approx(1.5) and grad == pytest.approx(1.5) and stats["clip_frac"] == 0.0


def test_clip_frac_counts_only_masked_tokens():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 1.0, 1.5, 1.5]]))  # last token masked
    _, stats = policy_loss(logp, old, torch.tensor([1.0]), torch.tensor([[1, 1, 1, 0]]),
                           eps_low=0.2, eps_high=0.2, aggregation="token-mean")
    assert stats["clip_frac"] == pytest.approx(2 / 3)
    assert stats["ratio_mean"] == pytest.approx(4 / 3)


# ----------------------------------------------------------------- KL, entropy


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # k1 = log 0.5 - log 0.25 = ln 2
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(0.69314718)
    # k2 = (ln 2)^2 / 2
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.24022651)
    # k3 = exp(ln 0.5) - (-ln 2) - 1 = 0.5 + 0.69314718 - 1
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.19314718)
    # equal policies: every estimator is 0
    for est in ("k1", "k2", "k3"):
        assert kl_penalty(ref, ref, est).item() == 0.0
    with pytest.raises(ThinklingError, match="kl_estimator 'k4'"):
        kl_penalty(logp, ref, "k4")


def test_kl_term_in_loss_by_hand():
    # ratio 1, A = 0: the loss is beta * k3 = 0.1 * 0.19314718
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    loss, stats = policy_loss(logp, logp, torch.zeros(1), torch.ones(1, 1), eps_low=0.2, eps_high=0.2,
                              aggregation="token-mean", ref_logp=ref, beta=0.1)
    assert loss.item() == pytest.approx(0.019314718)
    assert stats["kl_mean"] == pytest.approx(0.19314718)


def test_beta_zero_needs_no_reference():
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = policy_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), torch.ones(2, 3),
                              eps_low=0.2, eps_high=0.2, aggregation="token-mean", beta=0.0)
    assert loss.item() == 0.0 and "kl_mean" not in stats
    with pytest.raises(ThinklingError, match="beta > 0 needs ref_logp"):
        policy_loss(logp, logp.detach(), torch.zeros(2), torch.ones(2, 3), eps_low=0.2, eps_high=0.2,
                    aggregation="token-mean", beta=0.04)


def test_entropy_bonus_and_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, float("-inf"), float("-inf")]]])
    ent = entropy_from_logits(logits)
    assert torch.allclose(ent, torch.tensor([[math.log(4), math.log(2)]]))
    # ratio 1, A = 0: loss = -c * mean(H) = -0.5 * (ln 4 + ln 2) / 2
    loss, stats = policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1), torch.ones(1, 2),
                              eps_low=0.2, eps_high=0.2, aggregation="token-mean", entropy=ent, entropy_coef=0.5)
    assert loss.item() == pytest.approx(-0.25 * (math.log(4) + math.log(2)))
    assert stats["entropy_mean"] == pytest.approx((math.log(4) + math.log(2)) / 2)
    # the -inf entries give a finite gradient
    logits.requires_grad_(True)
    entropy_from_logits(logits).sum().backward()
    assert torch.isfinite(logits.grad).all()


# ------------------------------------------------------------------- presets


def test_presets():
    assert PRESETS["grpo"].aggregation == "seq-mean-token-mean"
    assert (PRESETS["grpo"].eps_low, PRESETS["grpo"].eps_high, PRESETS["grpo"].loss) == (0.2, 0.2, "clip")
    assert PRESETS["dr_grpo"].advantage == "dr_grpo"
    assert PRESETS["dr_grpo"].aggregation == "seq-mean-token-sum-norm"
    dapo = PRESETS["dapo"]
    assert (dapo.eps_low, dapo.eps_high, dapo.aggregation, dapo.dynamic_sampling, dapo.beta) == (
        0.2, 0.28, "token-mean", True, 0.0)
    cl = PRESETS["clgrpo"]
    assert (cl.eps_low, cl.eps_high, cl.advantage, cl.aggregation) == (0.2, 0.1, "grpo", "token-mean")
    assert set(RL_KNOBS) == {"advantage", "loss", "eps_low", "eps_high", "beta", "kl_estimator", "aggregation",
                             "dynamic_sampling", "entropy_coef"}
    for preset in PRESETS.values():
        preset.validate()


def test_rl_knobs_overrides():
    knobs = rl_knobs("clgrpo", {"eps_high": 0.05, "beta": None})
    assert knobs.eps_high == 0.05 and knobs.beta == 0.0
    assert PRESETS["clgrpo"].eps_high == 0.1  # the preset itself is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        knobs.beta = 1.0
    with pytest.raises(ThinklingError, match="rl.algorithm"):
        rl_knobs("ppo")
    with pytest.raises(ThinklingError, match="rl.epsilon"):
        rl_knobs("grpo", {"epsilon": 0.2})


@pytest.mark.parametrize("bad, key", [
    ({"eps_low": -0.1}, "rl.eps_low"),
    ({"eps_high": -1}, "rl.eps_high"),
    ({"beta": -0.01}, "rl.beta"),
    ({"eps_high": "big"}, "rl.eps_high"),
    ({"advantage": "ppo"}, "rl.advantage"),
    ({"aggregation": "sum"}, "rl.aggregation"),
    ({"kl_estimator": "k4"}, "rl.kl_estimator"),
    ({"dynamic_sampling": "yes"}, "rl.dynamic_sampling"),
    ({"loss": "ppo2"}, "rl.loss"),
])
def test_knobs_validate_names_the_key(bad, key):
    with pytest.raises(ThinklingError, match=key.replace(".", r"\.")):
        rl_knobs("grpo", bad)
