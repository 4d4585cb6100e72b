"""Math answer checking with `math-verify`, and the task type of natural-language math.

String equality is wrong for math (`\\frac{1}{2}` = `0.5`, `$1,234` = `1234`),
so answers are compared as SymPy objects by math-verify, after a light
normalisation of what it does not handle (dollar signs, thousands separators,
trailing unit words). Model text is parsed, never evaluated. Every check has a
time limit: math-verify's own SIGALRM timer on the main thread, and a worker
process killed on overrun elsewhere (signals only work on the main thread).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import re
import threading

from thinkling.errors import ThinklingError
from thinkling.tasks.base import Problem, Task, Verdict

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_ANSWER_IS = re.compile(r"answer is\s*:?\s*([^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\d+(?:,\d{3})*(?:\.\d+)?")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_CLAUSE_END = re.compile(r"\.(?:\s|$)|,\s|;")  # where a stated answer's sentence or clause ends
_NUMBER_AND_UNIT = re.compile(r"(-?\d[\d,]*(?:\.\d+)?)\s*(?:[A-Za-z]{2,}\.?\s*)+")


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (balanced braces) or `\\boxed 5`, else None."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    i = matches[-1].end()
    if not text.startswith("{", i):
        token = re.match(r"[^\s$]+", text[i:])
        return token[0] if token else None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None


def extract_math_answer(text: str) -> str | None:
    """The final answer of a completion: last `\\boxed{}`, else 'The answer is ...', else the last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    stated = list(_ANSWER_IS.finditer(text))
    if stated:
        # Only the stated clause: "The answer is 13. So 45 + 26 + 44 ..." states 13, and the
        # rest of the line must not be parsed (math-verify would find 45 + 26 + 44 in it).
        return _CLAUSE_END.split(stated[-1][1], maxsplit=1)[0].strip().rstrip(".").strip() or None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize(answer: str) -> str:
    """Strip what math-verify would misread: `$`, thousands commas, unit words after a number."""
    s = answer.strip().rstrip(".").replace("\\$", "").replace("$", "").strip()
    unit = _NUMBER_AND_UNIT.fullmatch(s)
    if unit:
        s = unit[1]
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


class _NoUntimedWarning(logging.Filter):
    """math-verify warns when called without its timer; the worker process is our timer."""

    def filter(self, record):
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_NoUntimedWarning())


def _sympy_equal(reference: str, answer: str, timeout: int | None) -> bool:
    from math_verify import parse, verify

    gold = parse(f"${reference}$", parsing_timeout=timeout)
    pred = parse(f"${answer}$", parsing_timeout=timeout)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout))


def math_equal(reference: str, answer: str, timeout: float = 5.0) -> bool:
    """Whether `answer` is mathematically equal to `reference`; False on timeout or parse failure."""
    ref, ans = normalize(reference), normalize(answer)
    if ref == ans:
        return bool(ref)
    if threading.current_thread() is not threading.main_thread():
        return _equal_in_worker(ref, ans, timeout)
    try:
        return _sympy_equal(ref, ans, max(1, math.ceil(timeout)))
    except Exception:
        return False


# Off the main thread math-verify cannot arm its SIGALRM timer, and a thread
# cannot be stopped (a huge power holds the GIL), so the check runs untimed in
# a worker process that is killed when it overruns. It is a "spawn" process
# (forking a threaded process is unsafe), so scripts need the usual
# `if __name__ == "__main__":` guard, as with any multiprocessing code.
_worker = None
_worker_lock = threading.Lock()


def _ready() -> bool:
    import math_verify  # noqa: F401  (imported once, before any time limit applies)

    return True


def _equal_in_worker(ref: str, ans: str, timeout: float) -> bool:
    global _worker
    with _worker_lock:
        try:
            if _worker is None:
                _worker = multiprocessing.get_context("spawn").Pool(1)
                _worker.apply(_ready)
            return bool(_worker.apply_async(_sympy_equal, (ref, ans, None)).get(timeout))
        except multiprocessing.TimeoutError:
            _worker.terminate()
            _worker = None
        except Exception:
            pass
        return False


def verify_math(reference: str, completion: str, timeout: float = 5.0, numeric: bool = False) -> Verdict:
    """Extract the completion's final answer and compare it with the reference answer.

    `numeric`: the answer must be a number. math-verify compares expressions symbolically, so
    without it "The answer is 45 + 26 + 44" is a right answer to "What is 45 + 26 + 44?"."""
    got = extract_math_answer(completion)
    if got is not None and numeric and not _NUMBER.fullmatch(normalize(got)):
        return Verdict(correct=False, extracted=got)
    return Verdict(correct=got is not None and math_equal(reference, got, timeout), extracted=got)


class MathTask(Task):
    """A fixed set of natural-language math problems (GSM8K, MATH, a JSONL file).

    Completions are free reasoning ending in `The answer is \\boxed{N}.`, checked
    with `verify_math`. `end_of_thinking` is None, meaning "the model's EOS token":
    these completions have no separate thinking block.

    `n` problems are the FIRST n in file order (how "GSM8K, first 200" is reported),
    not a random sample; `skip` drops the first problems, so one file can give
    disjoint train and eval sets.
    """

    end_of_thinking = None
    line_based = False  # the answer sentence may follow any token
    timeout = 5.0
    skip = 0
    numeric_answers = False  # answers are numbers (GSM8K): an expression is not accepted as one
    default_template = "gsm8k"  # `template: true`: the word-problem rule set (tasks.templates)

    def set_skip(self, skip) -> None:
        if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
            raise ThinklingError(f"task '{self.name}': skip must be an integer >= 0, got {skip!r}")
        self.skip = skip

    def load(self) -> list[Problem]:
        """Every problem of the set, in a fixed order."""
        raise NotImplementedError

    def all_problems(self) -> list[Problem]:
        """The set after `skip`, loaded once."""
        if not hasattr(self, "_problems"):
            problems = self.load()
            if self.skip >= len(problems):
                raise ThinklingError(f"task '{self.name}': skip={self.skip} leaves no problem (the set has {len(problems)})")
            self._problems = problems[self.skip :]
        return self._problems

    def problems(self, n, seed, difficulty=None):
        """The first `n` problems (all when n is None), after `skip` and the `difficulty` filter;
        `seed` is unused: a subset of a fixed set is a prefix, comparable across runs and seeds."""
        pool = self.all_problems()
        if difficulty is not None:
            levels = {float(d) for d in (difficulty if isinstance(difficulty, (list, tuple)) else [difficulty])}
            pool = [p for p in pool if p.difficulty in levels]
            if not pool:
                raise ThinklingError(f"task '{self.name}': no problem has difficulty {difficulty!r}")
        if n is None:
            return list(pool)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= len(pool):
            raise ThinklingError(f"task '{self.name}': n must be an int in 0..{len(pool)} (the set's size), got {n!r}")
        return pool[:n]

    def verify(self, problem: Problem, completion: str) -> Verdict:
        return verify_math(problem.answer, completion, self.timeout, numeric=self.numeric_answers)

    def format_ok(self, completion: str) -> bool:
        return last_boxed(completion) is not None or "the answer is" in completion.lower()

    def answer_line(self, problem: Problem) -> str:
        return f"The answer is \\boxed{{{problem.answer}}}."
