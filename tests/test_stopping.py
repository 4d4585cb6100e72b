"""Temperature-scaled stopping and budget forcing on a fake, scripted logits stream."""

import math

import pytest
import torch

from thinkling.errors import ThinklingError
from thinkling.rollout.stopping import (
    BudgetForcing,
    TemperatureScaledStopping,
    make_stop_processor,
)

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


# ------------------------------------------------------- line-aware budget forcing
NL = 9  # the newline id of the fake model


def writes_lines_of_4(history):
    """Thinks in lines of 3 tokens + newline, forever."""
    line = len(history) - 1 - max((i for i, x in enumerate(history) if x == NL), default=-1)
    return NL if line == 3 else FREE


def test_line_budget_waits_for_the_line_end_then_forces_the_marker():
    proc = BudgetForcing(EOT, budget=5, line_end=NL, line_grace=4)
    # B = 5 falls inside the second line: the row finishes it, then the marker starts the next line
    assert greedy(proc, writes_lines_of_4, 11) == [5, 5, 5, NL, 5, 5, 5, NL, 1, 2, 5]
    # at a line start when the budget is reached: the marker comes at once
    assert greedy(BudgetForcing(EOT, budget=4, line_end=NL, line_grace=4), writes_lines_of_4, 7) == \
        [5, 5, 5, NL, 1, 2, 5]


def test_line_budget_forces_the_newline_after_the_grace():
    proc = BudgetForcing(EOT, budget=4, line_end=NL, line_grace=2)
    # a row that never ends its line gets the newline at B + grace, then the marker
    assert greedy(proc, never_stops, 10) == [5, 5, 5, 5, 5, 5, NL, 1, 2, 5]
    assert proc.max_overrun == 2 + 1 + 2 == len([5, 5, NL, 1, 2])
    # grace 0: the newline right at the budget (a plain "\nA:" marker for a mid-line row)
    assert greedy(BudgetForcing(EOT, budget=4, line_end=NL), never_stops, 8) == [5, 5, 5, 5, NL, 1, 2, 5]


def test_line_budget_completes_a_marker_begun_at_a_line_start_only():
    proc = BudgetForcing(EOT, budget=3, line_end=NL, line_grace=5)
    out = proc(torch.zeros(1, V), torch.tensor([[5, NL, 1]]))  # "A" at a line start: finish it
    assert out[0].argmax().item() == 2 and torch.isinf(out[0, 1])
    logits = torch.randn(2, V)
    out = proc(logits, torch.tensor([[5, 5, 1], [5, 5, 5]]))  # "A" mid-line / mid-line: free within the grace
    assert torch.equal(out, logits)


def test_line_budget_validation():
    with pytest.raises(ThinklingError, match="line_end"):
        BudgetForcing(EOT, budget=3, line_end=EOT[0])
    with pytest.raises(ThinklingError, match="line_grace"):
        BudgetForcing(EOT, budget=3, line_end=NL, line_grace=-1)


def test_line_budget_is_stateless_under_row_compaction():
    history = torch.tensor([[5, 5, NL, 5, 5, 5], [5, NL, 5, 5, NL, 1], [5, 5, 5, 5, 5, 5], [1, 2, 5, NL, 5, 5]])
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    for proc in (BudgetForcing(EOT, budget=4, line_end=NL, line_grace=1), BudgetForcing(EOT, budget=6, line_end=NL)):
        full = proc(logits, history)
        keep = torch.tensor([3, 0, 2])
        assert torch.equal(proc(logits[keep], history[keep]), full[keep])


@pytest.fixture(scope="module")
def chain_model():
    """A tiny character model SFT'd for a few seconds on 2-3 step `chain` traces."""
    from thinkling.config import SFTConfig
    from thinkling.models.tiny import TinyPolicy
    from thinkling.tasks import get_task
    from thinkling.train.sft import sft_examples, train_sft

    task = get_task("chain")
    policy = TinyPolicy.create({"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 128}, seed=0)
    train_sft(policy, sft_examples(policy, task, task.problems(2000, 0, [2, 3])),
              SFTConfig(steps=400, batch_size=32, lr=3e-3, warmup_steps=10), seed=0)
    return policy, task


def test_budget_forcing_on_chain_puts_the_answer_marker_at_a_line_start(chain_model):
    """B = 10 falls inside the second step line (`37+5=42` + newline = 8 tokens): the library's
    forcing for a line-based task lets the line end and writes `A:` at the next line start."""
    from thinkling.config import EvalConfig
    from thinkling.eval.evaluate import evaluate

    policy, task = chain_model
    assert task.line_based
    problems = task.problems(30, 1, [3])
    cfg = EvalConfig(max_new_tokens=48, samples=1)

    def completions(processor):
        _, rows = evaluate(policy, task, problems, cfg, stop_processor=processor)
        return [r["completion"] for r in rows]

    marker = tuple(policy.encode_text("A:"))
    cut = completions(BudgetForcing(marker, 10))  # s1's plain cut at exactly B
    assert any("A:" in c and not c.startswith("A:") and "\nA:" not in c for c in cut), "B must fall mid-line"
    lines = completions(make_stop_processor(policy, task, budget=10))
    for c in lines:
        first = c.index("A:")
        assert first == 0 or c[first - 1] == "\n", c  # the forced marker starts a line
        assert first <= 10 + 16 + 1, c  # within budget + grace + newline
        assert task.format_ok(c), c


# ------------------------------------------------------------------- factory


class _CharPolicy:
    eos_id = 0

    def encode_text(self, text):
        return [NL if c == "\n" else ord(c) - 60 for c in text]  # "AB" -> [5, 6]


class _Task:
    end_of_thinking = "AB"


class _LineTask:
    end_of_thinking = "AB"
    line_based = True


class _NoThinkingTask:
    end_of_thinking = ""
    line_based = True  # ignored: EOS is not a line marker


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
    out = both(torch.zeros(1, V), torch.tensor([[8]]))
    assert out[0, 5].item() == pytest.approx(math.log(2.0))
    assert bf.line_end is None and both.processors[1].line_end is None  # not line-based


def test_make_stop_processor_is_line_aware_for_line_based_tasks():
    from thinkling.rollout.stopping import LINE_GRACE
    from thinkling.tasks import get_task

    bf = make_stop_processor(_CharPolicy(), _LineTask(), budget=3)
    assert (bf.line_end, bf.line_grace, bf.end_of_thinking) == (NL, LINE_GRACE, (5, 6))
    assert make_stop_processor(_CharPolicy(), _LineTask(), budget=3, line_grace=2).line_grace == 2
    # a marker that writes its own newline needs no line handling
    line_marker = type("T", (), {"end_of_thinking": "\nAB", "line_based": True})()
    assert make_stop_processor(_CharPolicy(), line_marker, budget=3).line_end is None
    # the synthetic tasks are line-based (answer line "A:<n>"), the math benchmarks are not
    assert get_task("chain").line_based and get_task("countdown").line_based
    from thinkling.tasks.mathverify import MathTask
    assert MathTask.line_based is False


def test_eval_wait_reaches_budget_forcing(monkeypatch, tiny_policy, capsys):
    """`thinkling eval --budget B --wait N` (eval.wait): early stops become "Wait" up to N times."""
    from thinkling.cli import main
    from thinkling.eval import evaluate as evaluate_module

    seen = {}
    real = evaluate_module.make_stop_processor

    def spy(policy, task, **kwargs):
        seen.update(kwargs)
        return real(policy, task, **kwargs)

    monkeypatch.setattr(evaluate_module, "make_stop_processor", spy)
    from thinkling.config import EvalConfig
    from thinkling.eval.evaluate import evaluate_policy
    from thinkling.tasks import get_task

    task = get_task("chain")
    cfg = EvalConfig(size=2, difficulty=2, max_new_tokens=30, budget=10, wait=2, wait_text="Wait")
    evaluate_policy(tiny_policy, task, task.problems(2, 0, 2), cfg)
    assert seen["max_waits"] == 2 and seen["wait"] == "Wait" and seen["budget"] == 10
    assert main(["eval", "--model", "smollm2-135m", "--wait", "2"]) == 2
    assert "'--wait'" in capsys.readouterr().err
