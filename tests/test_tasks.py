"""Synthetic tasks, the reasoning-gym adapter, the JSONL loader and math answer checking."""

from __future__ import annotations

import json
import threading
import time
from itertools import product

import pytest

from thinkling.errors import ThinklingError
from thinkling.tasks import get_task, list_tasks
from thinkling.tasks.arithmetic import ArithmeticTask
from thinkling.tasks.base import Problem, render_completion
from thinkling.tasks.countdown import steps_reach
from thinkling.tasks.gym import gym_answer, metadata_difficulty
from thinkling.tasks.jsonl import load_jsonl
from thinkling.tasks.mathverify import (
    extract_math_answer,
    last_boxed,
    math_equal,
    verify_math,
)
from thinkling.tasks.mnns import optimal_traces

SYNTHETIC = {"chain": range(1, 9), "mnns": range(1, 9), "countdown": range(2, 6)}


def fingerprint(problems):
    return [(p.id, p.prompt, p.answer, p.steps, p.difficulty) for p in problems]


def test_registry_has_every_builtin_task():
    assert {"chain", "mnns", "countdown", "gym", "jsonl", "gsm8k", "math500", "math"} <= set(list_tasks())
    with pytest.raises(ThinklingError, match="chain"):
        get_task("chain", nonsense=1)


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_generators_are_deterministic_in_the_seed(name):
    task = get_task(name)
    assert fingerprint(task.problems(20, seed=3)) == fingerprint(task.problems(20, seed=3))
    assert [p.prompt for p in task.problems(20, seed=3)] != [p.prompt for p in task.problems(20, seed=4)]


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_expert_traces_verify_and_wrong_answers_fail(name):
    task = get_task(name)
    for level in SYNTHETIC[name]:
        for p in task.problems(25, seed=level, difficulty=level):
            assert p.difficulty == level and p.prompt.isascii()
            assert task.verify(p, task.target(p)).correct, (p.prompt, p.steps)
            assert task.format_ok(task.target(p))
            wrong = str(int(p.answer) + 1)
            assert not task.verify(p, render_completion(p.steps, wrong)).correct
            assert not task.verify(p, "\n".join(p.steps)).correct  # no answer line


@pytest.mark.parametrize("name", sorted(SYNTHETIC))
def test_bad_difficulty_and_count_are_user_errors(name):
    task = get_task(name)
    for bad in (0, -1, "3", [], 2.5):
        with pytest.raises(ThinklingError, match="difficulty"):
            task.problems(2, seed=0, difficulty=bad)
    with pytest.raises(ThinklingError, match="give a number of problems"):
        task.problems(None, seed=0)


def test_difficulty_list_mixes_levels():
    problems = get_task("chain").problems(60, seed=0, difficulty=[2, 5])
    assert {p.difficulty for p in problems} == {2.0, 5.0}
    assert all(len(p.steps) == p.difficulty for p in problems)


@pytest.mark.parametrize("digits", [1, 2])
def test_chain_steps_stay_in_range_and_chain_left_to_right(digits):
    top = 10 ** (digits + 1) - 1
    for p in get_task("chain", digits=digits, trace="equation").problems(200, seed=1, difficulty=6):
        tokens = p.prompt.split()
        value = int(tokens[0])
        assert 0 <= value <= top
        for op, step in zip(tokens[1:], p.steps):
            assert 1 <= int(op[1:]) < 10**digits
            new = value + int(op)
            assert 0 <= new <= top and step == f"{value}{op}={new}"
            value = new
        assert p.answer == str(value)
    with pytest.raises(ThinklingError, match="digits"):
        get_task("chain", digits=0)


def test_chain_example_format():
    p = get_task("chain", trace="equation").problems(1, seed=0, difficulty=3)[0]
    start, *ops = p.prompt.split(" ")
    assert len(ops) == 3 and all(op[0] in "+-" and op[1:].isdigit() for op in ops)
    assert p.steps[0].startswith(start + ops[0] + "=")
    with pytest.raises(ThinklingError, match="trace"):
        get_task("chain", trace="prose")


def test_chain_rewrite_trace_turns_an_anchor_into_a_shorter_problem():
    """After k rewrite steps, what is left is exactly an (n-k)-step chain prompt with the same answer."""
    task = get_task("chain", trace="rewrite")
    for p in task.problems(50, seed=3, difficulty=6):
        start, *ops = p.prompt.split(" ")
        for k, step in enumerate(p.steps, start=1):
            equation, *rest = step.split(" ")
            assert rest == ops[k:]
            assert int(equation.split("=")[1]) == int(start) + sum(int(op) for op in ops[:k])
        assert p.steps[-1].endswith("=" + p.answer)


def signed_totals(digits):
    return [sum(s * d for s, d in zip(signs, digits)) for signs in product((1, -1), repeat=len(digits))]


def test_mnns_answer_is_the_brute_force_minimum_and_all_optimal_traces_are_listed():
    task = get_task("mnns")
    for p in task.problems(200, seed=0, difficulty=[1, 2, 3, 4, 5, 6]):
        digits = p.meta["digits"]
        assert p.prompt == " ".join(map(str, digits)) and all(1 <= d <= 9 for d in digits)
        totals = signed_totals(digits)
        assert int(p.answer) == min(t for t in totals if t >= 0)
        traces = optimal_traces(digits)
        assert len(traces) == len(set(traces)) == totals.count(int(p.answer))
        assert p.steps in traces
        for trace in traces:  # any optimal trace is a correct completion
            assert trace[-1].endswith(f"={p.answer}")
            assert task.verify(p, render_completion(trace, p.answer)).correct


def test_mnns_example():
    # 3 5 2 8: the total is 18 and no subset sums to 9, so the minimum is 2 (negate {8} or {3, 5}).
    assert optimal_traces([3, 5, 2, 8]) == [("+3=3", "+5=8", "+2=10", "-8=2"), ("-3=-3", "-5=-8", "+2=-6", "+8=2")]


def test_countdown_accepts_any_valid_route_and_rejects_cheats():
    numbers = [3, 7, 5]
    assert steps_reach(numbers, 26, ["7*3=21", "21+5=26"])
    assert steps_reach(numbers, 26, ["3 * 7 = 21", "5+21=26"])  # spaces, other order
    assert steps_reach([2, 2, 6], 10, ["6+2=8", "8+2=10"])  # a repeated given number used twice
    assert steps_reach([4, 2, 9], 11, ["4/2=2", "9+2=11"])  # exact division
    assert not steps_reach(numbers, 26, ["7*3=21", "21+5=27"])  # wrong arithmetic
    assert not steps_reach(numbers, 26, ["7*3=21", "21+7=28", "28-2=26"])  # 7 reused, 2 not given
    assert not steps_reach([7, 2, 1], 4, ["7/2=3", "3+1=4"])  # division with remainder
    assert not steps_reach([3, 5], 2, ["3-5=2"])  # negative result
    assert not steps_reach(numbers, 26, ["7*3=21"])  # does not reach the target
    assert not steps_reach(numbers, 26, ["so 7*3=21", "21+5=26"])  # not a step line
    assert not steps_reach(numbers, 26, ["7*3=21", "21+5=26", "26+0=26"])  # 0 is not available


def test_countdown_verifier_uses_the_steps_and_the_answer_line():
    task = get_task("countdown")
    p = task.problems(1, seed=0)[0]
    numbers, target = p.prompt.split(" -> ")
    assert task.verify(p, task.target(p)).correct
    assert not task.verify(p, f"A:{target}").correct  # the answer alone proves nothing
    assert not task.verify(p, render_completion(p.steps, str(int(target) + 1))).correct
    assert int(target) not in map(int, numbers.split())  # the target is never given


def test_gym_adapter_scores_with_the_dataset_scorer():
    task = get_task("gym", dataset="basic_arithmetic")
    problems = task.problems(6, seed=0)
    assert fingerprint(problems) == fingerprint(task.problems(6, seed=0))
    assert [p.prompt for p in problems] != [p.prompt for p in task.problems(6, seed=1)]
    for p in problems:
        assert p.steps == () and 0.0 <= p.difficulty <= 1.0
        assert task.verify(p, "thinking...\n" + task.target(p)).correct
        assert not task.verify(p, f"A:{p.answer}0").correct
        assert not task.verify(p, p.answer).correct  # no A: line
    leveled = task.problems(10, seed=0, difficulty=[0, 3])
    assert {p.difficulty for p in leveled} <= {0.0, 3.0}


def test_gym_multiline_answers_and_metadata_difficulty():
    assert gym_answer("work\nA:1 2\n3 4\n") == "1 2\n3 4"
    assert gym_answer("A:7") == "7" and gym_answer("no answer") is None
    meta = {"numbers": [1, 2, 3, 4, 5], "difficulty": {"numbers": (4, 6)}}
    assert metadata_difficulty(meta) == 0.5
    assert metadata_difficulty({"difficulty": 2.0}) == 2.0 and metadata_difficulty({}) == 0.0
    with pytest.raises(ThinklingError, match="unknown reasoning-gym dataset"):
        get_task("gym", dataset="nope")
    with pytest.raises(ThinklingError, match="bad options"):
        get_task("gym", dataset="countdown", no_such_knob=1)


def write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_reads_gsm8k_and_math_records(tmp_path):
    gsm = {"question": "Q1?", "answer": "She has 2 + 3 = <<2+3=5>>5 apples.\nThen 5 * 2 = <<5*2=10>>10.\n#### 1,000"}
    solution = "First.\n\nSo $\\boxed{\\frac{1}{\\sqrt{2}}}$."
    math = {"problem": "Q2?", "solution": solution, "answer": "bad", "level": "Level 4", "type": "Number Theory"}
    bare = {"question": "Q3?", "answer": 7, "id": "mine"}
    path = write(tmp_path, [json.dumps(gsm), "", json.dumps(math), json.dumps(bare)])
    gsm, math, bare = get_task("jsonl", path=str(path)).problems(None, seed=0)
    assert gsm.answer == "1000" and gsm.steps == ("She has 2 + 3 = 5 apples.", "Then 5 * 2 = 10.")
    assert math.answer == "\\frac{1}{\\sqrt{2}}" and math.steps == ("First.", "So $\\boxed{\\frac{1}{\\sqrt{2}}}$.")
    assert math.difficulty == 4.0 and math.tags == ("number_theory",) and math.id == "data-3"
    assert bare.answer == "7" and bare.steps == () and bare.id == "mine"
    task = get_task("jsonl", path=str(path))
    for p in (gsm, math, bare):
        assert task.verify(p, task.target(p)).correct
    assert task.end_of_thinking is None


def test_jsonl_verbatim_trains_distilled_traces_as_written(tmp_path):
    """Traces from `thinkling distill` already end with the answer line their verifier read; without
    `verbatim` the math answer line is appended a second time."""
    chain = {"id": "c", "question": "37 +5 -8", "solution": "37+5=42\n42-8=34\nA:34", "answer": "34"}
    math = {"id": "m", "question": "2+3?", "solution": "2+3 = 5.\n\nThe answer is \\boxed{5}.", "answer": "5"}
    path = write(tmp_path, [json.dumps(chain), json.dumps(math)])
    plain = get_task("jsonl", path=str(path))
    assert plain.target(plain.problems(1, seed=0)[0]).endswith("A:34\nThe answer is \\boxed{34}.")
    task = get_task("jsonl", path=str(path), verbatim=True)
    c, m = task.problems(None, seed=0)
    assert task.target(c) == chain["solution"] and c.steps == ("37+5=42", "42-8=34")
    assert task.target(m) == "2+3 = 5.\nThe answer is \\boxed{5}." and task.verify(m, task.target(m)).correct
    # the target is what the chain task itself verifies: the same prompt, the same trace
    assert get_task("chain", strict=True).verify(Problem(id="c", prompt="37 +5 -8", answer="34"), task.target(c)).correct
    with pytest.raises(ThinklingError, match="verbatim must be true or false"):
        get_task("jsonl", path=str(path), verbatim="yes")
    bare = write(tmp_path, [json.dumps({"id": "b", "question": "Q?", "answer": 3})])
    with pytest.raises(ThinklingError, match="record 'b' has no solution"):
        get_task("jsonl", path=str(bare), verbatim=True).problems(None, seed=0)


def test_jsonl_limit_is_the_first_n_in_file_order(tmp_path):
    path = write(tmp_path, [json.dumps({"question": f"Q{i}?", "answer": f"#### {i}", "level": i % 2})
                            for i in range(10)])
    task = get_task("jsonl", path=str(path))
    first = task.problems(4, seed=1)
    assert [p.answer for p in first] == ["0", "1", "2", "3"] and first == task.problems(4, seed=2)
    assert [p.answer for p in task.problems(2, seed=0, difficulty=1)] == ["1", "3"]  # filter, then the first n
    assert [p.answer for p in get_task("jsonl", path=str(path), skip=8).problems(None, seed=0)] == ["8", "9"]
    with pytest.raises(ThinklingError, match="skip"):
        get_task("jsonl", path=str(path), skip=-1)
    with pytest.raises(ThinklingError, match="leaves no problem"):
        get_task("jsonl", path=str(path), skip=10).problems(None, seed=0)


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "not valid JSON"),
        ('{"answer": "#### 3"}', "no 'question' or 'problem'"),
        ('{"question": "Q?", "solution": "no final answer here"}', "no final answer"),
        ('{"question": "Q?", "answer": "work\\n#### "}', "no final answer"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad, message):
    path = write(tmp_path, ['{"question": "ok?", "answer": "#### 1"}', bad])
    with pytest.raises(ThinklingError, match=f"data.jsonl:2: {message}"):
        load_jsonl(path)
    with pytest.raises(ThinklingError, match="no such file"):
        load_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $\\boxed{\\frac{1}{2}}$ and more", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{\\{a, b\\}}", "\\{a, b\\}"),
        ("The answer is $18.", "$18"),
        ("the answer is: 3.5.", "3.5"),
        ("The answer is 13. To sum up, 45 + 26 + 44 = 110", "13"),  # the stated clause only
        ("The answer is 116, i.e. 45+26+44", "116"),
        ("She pays 1,234 dollars in total.", "1,234"),
        ("5 - 3 = 2, so x-4", "4"),
        ("the change is -7 now", "-7"),
        ("no numbers", None),
    ],
)
def test_math_answer_extraction(text, expected):
    assert extract_math_answer(text) == expected


def test_last_boxed_balances_braces():
    assert last_boxed("\\boxed{\\frac{a}{b}} x") == "\\frac{a}{b}"
    assert last_boxed("\\boxed 5$") == "5"
    assert last_boxed("\\boxed{open") is None and last_boxed("none") is None


@pytest.mark.parametrize(
    "reference, completion",
    [
        ("0.5", "\\boxed{\\frac{1}{2}}"),
        ("\\frac{1}{2}", "The answer is 0.5"),
        ("1234", "The answer is 1,234."),
        ("1,234", "\\boxed{1234}"),
        ("-3", "\\boxed{-3}"),
        ("18", "The answer is $18."),
        ("18", "\\boxed{\\$18}"),
        ("18", "The answer is 18 dollars."),
        ("18", "\\boxed{18 \\text{ dollars}}"),
        ("18", "She earns $18.00 a day."),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\frac{\\pi}{2})}"),
        ("2\\sqrt{2}", "\\boxed{\\sqrt{8}}"),
    ],
)
def test_math_equivalent_answers_verify(reference, completion):
    assert verify_math(reference, completion).correct


@pytest.mark.parametrize(
    "reference, completion",
    [
        ("18", "\\boxed{-18}"),
        ("0.5", "\\boxed{\\frac{1}{3}}"),
        ("1234", "The answer is 1,235."),
        ("7", "no number"),
        ("3", ""),
    ],
)
def test_math_wrong_answers_fail(reference, completion):
    assert not verify_math(reference, completion).correct


def test_numeric_answers_must_be_numbers():
    assert verify_math("115", "The answer is 45 + 26 + 44.").correct  # symbolic equality, right for MATH
    assert not verify_math("115", "The answer is 45 + 26 + 44.", numeric=True).correct
    assert verify_math("1234", "The answer is $1,234.", numeric=True).correct
    assert not get_task("gsm8k").verify(Problem(id="g", prompt="?", answer="115"), "The answer is 100 + 15.").correct


def test_math_check_off_the_main_thread_and_under_a_time_limit():
    results = {}

    def run():
        results["right"] = math_equal("0.5", "\\frac{1}{2}")
        start = time.perf_counter()
        results["huge"] = math_equal("5", "9^{9^{9^{9}}}", timeout=1)
        results["seconds"] = time.perf_counter() - start

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(60)
    assert results["right"] is True and results["huge"] is False and results["seconds"] < 10
    start = time.perf_counter()
    assert not math_equal("5", "9^{9^{9^{9}}}", timeout=1)  # main thread: math-verify's own timer
    assert time.perf_counter() - start < 10


def test_chain_slips_make_consistent_imperfect_traces():
    from thinkling.tasks.chain import ChainTask

    clean = ChainTask().problems(50, seed=3, difficulty=[4])
    assert ChainTask(slips=0.0).problems(50, seed=3, difficulty=[4]) == clean
    noisy = ChainTask(slips=0.5).problems(200, seed=3, difficulty=[4])
    wrong = 0
    for p in noisy:
        value = int(p.prompt.split()[0])
        for op, step in zip(p.prompt.split()[1:], p.steps):
            lhs, result = step.split("=")
            assert lhs == f"{value}{op}"  # each step continues from the line above, slip or not
            wrong += int(result) != value + int(op)
            assert 1 <= abs(int(result) - value - int(op)) <= 5 or int(result) == value + int(op)
            value = int(result)
        assert p.answer == str(value)
    assert 0.4 < wrong / (4 * len(noisy)) < 0.6
    with pytest.raises(ThinklingError, match="slips"):
        ChainTask(slips=1.0)


def test_chain_merge_makes_shorter_traces_of_the_same_sum():
    """merge > 0 joins operations on one line (fewer, harder steps); the arithmetic stays right."""
    import re

    task = get_task("chain", merge=0.5)
    problems = task.problems(200, seed=4, difficulty=[4])
    lines = [len(p.steps) for p in problems]
    assert min(lines) < 4 and max(lines) == 4 and all(1 <= n <= 4 for n in lines)
    for p in problems:
        value = int(p.prompt.split()[0])
        for step in p.steps:
            start, ops, result = re.fullmatch(r"(\d+)((?:[+-]\d)+)=(\d+)", step).groups()
            assert int(start) == value and eval(start + ops) == int(result)  # noqa: S307 (digits and +/- only)
            value = int(result)
        assert str(value) == p.answer and task.verify(p, task.target(p)).correct
    assert all(len(p.steps) == 1 for p in get_task("chain", merge=1.0).problems(20, seed=0, difficulty=[5]))
    assert get_task("chain", merge=0.0).problems(30, seed=1) == get_task("chain").problems(30, seed=1)
    with pytest.raises(ThinklingError, match="merge"):
        get_task("chain", merge=1.5)


def test_chain_verbose_traces_end_with_redundant_checks():
    task = get_task("chain_verbose")
    for p in task.problems(50, seed=0, difficulty=[3]):
        target = task.target(p)
        checks = p.meta["checks"]
        assert target.startswith("".join(f"{s}\n" for s in p.steps)) and len(checks) <= 3
        assert all(c.startswith("check ") and c[6:] in p.steps for c in checks)
        assert task.verify(p, target).correct


def test_arithmetic_sums_verify_only_when_the_answer_is_stated():
    task = get_task("arithmetic")
    problems = task.problems(50, seed=0, difficulty=[2, 4])
    assert {p.difficulty for p in problems} == {2.0, 4.0}
    assert fingerprint(problems) == fingerprint(task.problems(50, seed=0, difficulty=[2, 4]))
    for p in problems:
        assert p.prompt.startswith("What is ") and len(p.steps) == p.difficulty - 1
        assert eval(p.prompt[8:-1]) == int(p.answer)  # noqa: S307 (digits and +/- only)
        assert task.verify(p, task.target(p)).correct
        assert task.verify(p, f"It is {p.answer}. The answer is {p.answer}.").correct
        assert not task.verify(p, "\n".join(p.steps)).correct  # a number at the end is not a stated answer
        assert not task.verify(p, f"The answer is \\boxed{{{int(p.answer) + 1}}}.").correct
        # Restating the question is not an answer (math-verify alone finds the sum equal).
        assert not task.verify(p, f"The answer is {p.prompt[8:-1]}.").correct
        assert not task.verify(p, f"The answer is 1. Indeed {p.prompt[8:-1]} is it.").correct
    assert all(int(p.answer) >= 0 for p in get_task("arithmetic", subtract=True).problems(50, seed=1, difficulty=4))
    with pytest.raises(ThinklingError, match="digits"):
        get_task("arithmetic", digits=0)
    asked = get_task("arithmetic", instruct=True).problems(3, seed=0)
    assert [p.prompt for p in asked] == [p.prompt + ArithmeticTask.INSTRUCTION for p in task.problems(3, seed=0)]
    with pytest.raises(ThinklingError, match="instruct"):
        get_task("arithmetic", instruct="yes")


def test_arithmetic_rewrite_trace_rewrites_the_whole_sum_one_addition_per_line():
    """`trace: rewrite` keeps the problems and the anchor points (one step per addition); each line
    restates what is left with its first two operands added, so the last line is a `pairs` line."""
    pairs, rewrite = get_task("arithmetic", subtract=True), get_task("arithmetic", subtract=True, trace="rewrite")
    for a, b in zip(pairs.problems(40, seed=3, difficulty=[2, 3, 5]), rewrite.problems(40, seed=3, difficulty=[2, 3, 5])):
        assert (a.prompt, a.answer, len(a.steps)) == (b.prompt, b.answer, len(b.steps))
        assert b.steps[0].startswith(a.prompt[8:-1] + " = ") and b.steps[-1] == a.steps[-1]
        for line, next_line in zip(b.steps, b.steps[1:]):
            left, right = line.split(" = ")
            assert eval(left) == eval(right) and next_line.startswith(right + " = ")  # noqa: S307
        assert rewrite.verify(b, rewrite.target(b)).correct
    (p,) = get_task("arithmetic", trace="rewrite").problems(1, seed=0, difficulty=3)
    x, y, z = (int(t) for t in p.prompt[8:-1].split(" + "))
    assert p.steps == (f"{x} + {y} + {z} = {x + y} + {z}", f"{x + y} + {z} = {x + y + z}")
    with pytest.raises(ThinklingError, match="trace must be one of pairs, rewrite"):
        get_task("arithmetic", trace="running")


def test_arithmetic_midline_cuts_each_line_after_its_equals_and_keeps_the_trace():
    """`midline: true` makes two steps of each line, `a + b =` and ` s`, joined back exactly: the
    same problems and SFT target, twice the steps, and a step end only after each result."""
    for trace in ("pairs", "rewrite"):
        whole, cut = get_task("arithmetic", trace=trace), get_task("arithmetic", trace=trace, midline=True)
        for a, b in zip(whole.problems(30, seed=4, difficulty=[2, 3, 4]), cut.problems(30, seed=4, difficulty=[2, 3, 4])):
            assert (a.prompt, a.answer, whole.target(a)) == (b.prompt, b.answer, cut.target(b))
            assert len(b.steps) == 2 * len(a.steps) and b.step_ends == ("", "\n") * len(a.steps)
            assert all(s.endswith(" =") for s in b.steps[::2]) and all(s.startswith(" ") for s in b.steps[1::2])
            assert cut.verify(b, cut.target(b)).correct
    (p,) = get_task("arithmetic", trace="rewrite", midline=True).problems(1, seed=0, difficulty=3)
    x, y, z = (int(t) for t in p.prompt[8:-1].split(" + "))
    assert p.steps == (f"{x} + {y} + {z} =", f" {x + y} + {z}", f"{x + y} + {z} =", f" {x + y + z}")
    with pytest.raises(ThinklingError, match="midline must be true or false"):
        get_task("arithmetic", midline="yes")


def test_strict_chain_checks_the_work_not_only_the_answer():
    """Two slips that cancel give the right answer with wrong steps: only the strict verifier says so."""
    strict, plain = get_task("chain", strict=True), get_task("chain")
    for p in strict.problems(40, seed=2, difficulty=[1, 3, 5]):
        assert strict.verify(p, strict.target(p)).correct
    p = Problem("x", "40 +3 -2", "41", ("40+3=43", "43-2=41"), 2.0)
    lucky = "40+3=44\n44-2=41\nA:41"  # +1 then a second slip of -1: the right answer
    assert plain.verify(p, lucky).correct and not strict.verify(p, lucky).correct
    assert not strict.verify(p, "40-2=38\n38+3=41\nA:41").correct  # operations out of order
    assert not strict.verify(p, "40+3=43\nA:41").correct  # an operation left out
    assert strict.verify(p, "40+3-2=41\nA:41").correct  # several operations on one line are fine
    with pytest.raises(ThinklingError, match="strict"):
        get_task("chain", strict=True, trace="rewrite")


def test_chain_per_line_fixes_the_operations_on_each_line():
    """`per_line: n` puts exactly n operations on every line but the last (one length per k, unlike
    `merge`'s random joins); the problems themselves are the plain task's, and strict accepts the trace."""
    pairs, plain = get_task("chain", per_line=2, strict=True), get_task("chain")
    for p, q in zip(pairs.problems(30, seed=4, difficulty=[1, 2, 3, 4, 5]), plain.problems(30, seed=4, difficulty=[1, 2, 3, 4, 5])):
        k = int(p.difficulty)
        assert (p.prompt, p.answer) == (q.prompt, q.answer)
        assert [s.count("+") + s.count("-") for s in p.steps] == [2] * (k // 2) + [1] * (k % 2)
        assert pairs.verify(p, pairs.target(p)).correct
    for bad in ({"per_line": -1}, {"per_line": 1.5}, {"per_line": 2, "merge": 0.5}, {"per_line": 2, "trace": "rewrite"}):
        with pytest.raises(ThinklingError, match="per_line"):
            get_task("chain", **bad)


def test_strict_chain_knows_a_partial_completion_is_lost_only_when_it_is():
    """`cannot_succeed` may stop a sample early (BREAD probes): it must never say so of a prefix of a
    completion that verifies, and it should say so once a wrong step line is followed by another line."""
    import random

    strict = get_task("chain", strict=True)
    assert not get_task("chain").cannot_succeed(Problem("x", "40 +3", "43"), "40+3=44\n4")  # plain: answer only
    p = Problem("x", "40 +3 -2", "41", ("40+3=43", "43-2=41"), 2.0)
    assert not strict.cannot_succeed(p, "40+3=44\n")  # the wrong line could still be the answer line
    assert not strict.cannot_succeed(p, "40+3=44\n<")  # ... or be replaced by a <check> line
    assert strict.cannot_succeed(p, "40+3=44\n4")  # now it is a step line for good
    assert strict.cannot_succeed(p, "40-2=38\n3")  # operations out of order
    assert strict.cannot_succeed(p, "40+3=43\n43-2=41\n41+1=42\nA")  # more operations than the prompt has
    assert not strict.cannot_succeed(p, "40+3=43\n43-2=41\nA:4")  # right so far
    fixed = "40+3=44\n<plan>a</plan>\n<check>40+3=43</check>\n43-2=41\nA:41"
    assert strict.verify(p, fixed).correct
    assert not any(strict.cannot_succeed(p, fixed[:i]) for i in range(len(fixed) + 1))
    # no prefix of a completion that verifies is ever called lost: targets (with plans and
    # corrected slips) and random edits of them, some of which still verify
    rng = random.Random(0)
    alphabet = "0123456789+-=\n A:<>/checkplan "
    seen = {"verified edits": 0, "lost": 0}
    for task in (strict, get_task("chain", strict=True, template=True, self_correct=0.5)):
        for q in task.problems(30, seed=5, difficulty=[1, 2, 3, 4]):
            target = task.target(q)
            for text in [target, target + "\n \n"] + ["".join(rng.choice(alphabet) if rng.random() < 0.05 else c
                                                             for c in target) for _ in range(20)]:
                if task.verify(q, text).correct:
                    seen["verified edits"] += text != target and not text.startswith(target)
                    assert not any(task.cannot_succeed(q, text[:i]) for i in range(len(text) + 1)), text
                else:
                    seen["lost"] += task.cannot_succeed(q, text)
    assert seen["verified edits"] > 0 and seen["lost"] > 500, seen  # the property was put to the test
