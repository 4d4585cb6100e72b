"""Temperature-scaled stopping and budget forcing on a fake, scripted logits stream."""

import math

import pytest
import torch

from thinkling.errors import ThinklingError
from thinkling.rollout.stopping import BudgetForcing, TemperatureScaledStopping, make_stop_processor

V = 10
EOT = (1, 2)  # a two-token end-of-thinking marker, like "A:" for the character model
WAIT = (7, 8)
FREE = 5  # what the fake model writes while thinking


def greedy(processor, prefer, steps):
    """Greedy decoding of a fake model whose logits are 5 on `prefer(history)` and 0 elsewhere."""
    history = []
    for _ in range(steps):
        logits = torch.zeros(1, V)
        logits[0, prefer(history)] = 5.0
        out = processor(logits, torch.tensor([history], dtype=torch.long).reshape(1, -1))
        history.append(int(out[0].argmax()))
    return history


def never_stops(history):
    return FREE


def wants_to_stop_from_2(history):
    """Thinks for two tokens, then tries to write the marker (and completes one it has begun)."""
    if history and history[-1] == EOT[0]:
        return EOT[1]
    return FREE if len(history) < 2 else EOT[0]


# ------------------------------------------------------------ temperature scaling


def test_alpha_one_is_identity():
    logits = torch.randn(3, V)
    history = torch.tensor([[5, 5], [1, 5], [3, 4]])
    assert torch.equal(TemperatureScaledStopping(EOT, 1.0)(logits, history), logits)


def test_alpha_raises_first_marker_token_by_log_alpha():
    logits = torch.randn(2, V)
    out = TemperatureScaledStopping(EOT, 2.5)(logits, torch.tensor([[5, 5, 5], [3, 4, 5]]))
    expected = logits.clone()
    expected[:, 1] += math.log(2.5)
    assert torch.allclose(out, expected)
    assert torch.equal(out[:, 2:], logits[:, 2:]) and torch.equal(out[:, 0], logits[:, 0])
    # acts from the very first generated token on
    first = TemperatureScaledStopping(EOT, 2.5)(logits, torch.zeros(2, 0, dtype=torch.long))
    assert torch.allclose(first, expected)


def test_alpha_multiplies_the_stop_probability():
    # uniform over 4 tokens: p(eot) = 1/4; times alpha 3 then renormalised: 3/(3 + 3) = 1/2
    out = TemperatureScaledStopping((0,), 3.0)(torch.zeros(1, 4), torch.zeros(1, 0, dtype=torch.long))
    assert torch.softmax(out, -1)[0, 0].item() == pytest.approx(0.5)
    # alpha < 1 delays stopping: 0.5/(0.5 + 3) = 1/7
    out = TemperatureScaledStopping((0,), 0.5)(torch.zeros(1, 4), torch.zeros(1, 0, dtype=torch.long))
    assert torch.softmax(out, -1)[0, 0].item() == pytest.approx(1 / 7)


def test_ts_leaves_finished_and_half_written_markers_alone():
    logits = torch.zeros(3, V)
    history = torch.tensor([[1, 2, 5], [5, 5, 1], [5, 5, 5]])  # marker done / marker begun / thinking
    out = TemperatureScaledStopping(EOT, 4.0)(logits, history)
    assert torch.equal(out[:2], logits[:2])
    assert out[2, 1].item() == pytest.approx(math.log(4.0))


def test_ts_validation():
    for alpha in (0.0, -1.0, float("inf")):
        with pytest.raises(ThinklingError, match="ts_alpha"):
            TemperatureScaledStopping(EOT, alpha)
    with pytest.raises(ThinklingError, match="end_of_thinking"):
        TemperatureScaledStopping((), 2.0)


# ------------------------------------------------------------------ budget forcing


def test_budget_forces_marker_at_exactly_b_then_releases():
    proc = BudgetForcing(EOT, budget=4)
    assert greedy(proc, never_stops, 9) == [5, 5, 5, 5, 1, 2, 5, 5, 5]
    # the forced steps allow one token only; before and after, the logits pass through untouched
    logits = torch.randn(1, V)
    forced = proc(logits, torch.tensor([[5, 5, 5, 5]]))
    assert forced[0, 1] == 0 and torch.isinf(forced[0, [0, *range(2, V)]]).all()
    forced = proc(logits, torch.tensor([[5, 5, 5, 5, 1]]))
    assert forced[0, 2] == 0 and torch.isinf(forced[0, [0, 1, *range(3, V)]]).all()
    assert torch.equal(proc(logits, torch.tensor([[5, 5, 5]])), logits)
    assert torch.equal(proc(logits, torch.tensor([[5, 5, 5, 5, 1, 2]])), logits)


def test_budget_leaves_rows_that_stopped_on_their_own():
    proc = BudgetForcing(EOT, budget=4)
    # after its own marker the fake model goes on writing 1, 2, ...: nothing is forced past the budget
    assert greedy(proc, wants_to_stop_from_2, 7) == [5, 5, 1, 2, 1, 2, 1]


def test_budget_completes_a_begun_marker():
    out = BudgetForcing(EOT, budget=3)(torch.zeros(1, V), torch.tensor([[5, 5, 1]]))
    assert out[0].argmax().item() == 2 and torch.isinf(out[0, 1])


def test_wait_forcing_up_to_max_waits():
    proc = BudgetForcing(EOT, budget=20, wait=WAIT, max_waits=2)
    # tries to stop at 2 -> "Wait" instead, twice; the third attempt goes through
    assert greedy(proc, wants_to_stop_from_2, 8) == [5, 5, 7, 8, 7, 8, 1, 2]
    # while waits remain the first marker token is impossible
    out = proc(torch.zeros(1, V), torch.tensor([[5, 5]]))
    assert torch.isinf(out[0, 1]) and out[0, 7].item() == pytest.approx(math.log(2.0))


def test_wait_forcing_stops_at_min_tokens():
    proc = BudgetForcing(EOT, budget=20, wait=WAIT, max_waits=5, min_tokens=4)
    assert greedy(proc, wants_to_stop_from_2, 6) == [5, 5, 7, 8, 1, 2]


def test_wait_then_budget():
    proc = BudgetForcing(EOT, budget=6, wait=WAIT, max_waits=10)
    # waits until the budget, then the marker is forced
    assert greedy(proc, wants_to_stop_from_2, 9) == [5, 5, 7, 8, 7, 8, 1, 2, 1]


def test_processors_are_stateless_under_row_compaction():
    g = torch.Generator().manual_seed(0)
    history = torch.tensor([[5, 5, 5, 5, 5], [5, 5, 7, 8, 5], [1, 2, 5, 5, 5], [5, 5, 5, 5, 1], [5, 7, 5, 5, 5]])
    logits = torch.randn(5, V, generator=g)
    for proc in (TemperatureScaledStopping(EOT, 3.0), BudgetForcing(EOT, budget=5),
                 BudgetForcing(EOT, budget=8, wait=WAIT, max_waits=2)):
        full = proc(logits, history)
        keep = torch.tensor([4, 1, 3])  # some rows finished, the rest reordered
        assert torch.equal(proc(logits[keep], history[keep]), full[keep])
        assert torch.equal(proc(logits, history), full)  # calling again changes nothing


def test_budget_forcing_validation():
    with pytest.raises(ThinklingError, match="budget"):
        BudgetForcing(EOT, budget=0)
    with pytest.raises(ThinklingError, match="max_waits"):
        BudgetForcing(EOT, budget=5, max_waits=2)
    with pytest.raises(ThinklingError, match="min_tokens"):
        BudgetForcing(EOT, budget=5, wait=WAIT, max_waits=1, min_tokens=9)
    with pytest.raises(ThinklingError, match="wait"):
        BudgetForcing(EOT, budget=5, wait=(1, 3), max_waits=1)


# ------------------------------------------------------------------- factory


class _CharPolicy:
    eos_id = 0

    def encode_text(self, text):
        return [ord(c) - 60 for c in text]  # "AB" -> [5, 6]


class _Task:
    end_of_thinking = "AB"


class _NoThinkingTask:
    end_of_thinking = ""


def test_make_stop_processor():
    policy = _CharPolicy()
    assert make_stop_processor(policy, _Task()) is None
    ts = make_stop_processor(policy, _Task(), ts_alpha=2.0)
    assert isinstance(ts, TemperatureScaledStopping) and ts.end_of_thinking == (5, 6)
    bf = make_stop_processor(policy, _NoThinkingTask(), budget=3)
    assert isinstance(bf, BudgetForcing) and bf.end_of_thinking == (0,)
    both = make_stop_processor(policy, _Task(), ts_alpha=2.0, budget=2)
    out = both(torch.zeros(1, V), torch.tensor([[9, 9]]))
    assert out[0].argmax().item() == 5 and torch.isinf(out[0, 6])  # forcing wins over the boost
    out = both(torch.zeros(1, V), torch.tensor([[9]]))
    assert out[0, 5].item() == pytest.approx(math.log(2.0))
