"""`jsonl`: GSM8K- or MATH-style problems from a local JSONL file.

One record a line: `question` or `problem`; a worked solution in `solution`
or `answer`; optionally a bare final `answer`. The final answer is the text
after `#### ` (GSM8K), else the solution's last `\\boxed{}` (MATH), else the
`answer` field. The solution, minus GSM8K's `<<calculator>>` annotations and
its `####` line, is split into steps (paragraphs, else lines) for SFT and
BREAD. As for the benchmarks, `n` problems are the first n in file order and
the `skip` option drops the first ones. The benchmark loaders reuse
`parse_record` for their records.

`image` (a path) or `images` (a list of paths) attach pictures to a record, for
vision-language policies: paths are relative to the JSONL file's folder and must
stay inside it (`tasks.images.load_image`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from thinkling.errors import ThinklingError
from thinkling.tasks.base import Problem, register_task
from thinkling.tasks.images import load_image
from thinkling.tasks.mathverify import MathTask, last_boxed, normalize

_CALCULATOR = re.compile(r"<<[^<>]*>>")
_LEVEL = re.compile(r"(?:Level\s*)?(\d+)")


def solution_steps(solution: str) -> tuple[str, ...]:
    """A worked solution as steps: paragraphs when it has blank lines, else lines."""
    text = _CALCULATOR.sub("", solution.split("####")[0])
    parts = text.split("\n\n") if "\n\n" in text.strip() else text.split("\n")
    return tuple(p.strip() for p in parts if p.strip())


def final_answer(solution: str | None, answer) -> str | None:
    """`#### N` (as a plain number: '1,600' -> '1600'), else the last `\\boxed{}`, else the answer field."""
    if solution and "####" in solution:
        return normalize(solution.split("####")[-1]) or None
    boxed = last_boxed(solution) if solution else None
    if boxed:
        return boxed
    return str(answer).strip() if answer is not None and str(answer).strip() else None


def _subject(name: str) -> str:
    """'Counting & Probability' -> 'counting_and_probability', the olmo folder naming."""
    return name.strip().lower().replace("&", "and").replace(" ", "_")


def _difficulty(record: dict) -> float:
    """A numeric `difficulty`/`level`, or MATH's 'Level 3'; 0 when absent."""
    value = record.get("level", record.get("difficulty"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    level = _LEVEL.fullmatch(value.strip()) if isinstance(value, str) else None
    return float(level[1]) if level else 0.0


def parse_record(record, where: str, id: str) -> Problem:
    """One GSM8K/MATH-style record as a Problem; `where` (file:line) names it in errors."""
    if not isinstance(record, dict):
        raise ThinklingError(f"{where}: expected a JSON object, got {type(record).__name__}")
    question = record.get("question", record.get("problem"))
    if not isinstance(question, str) or not question.strip():
        raise ThinklingError(f"{where}: no 'question' or 'problem' text")
    solution, answer = record.get("solution"), record.get("answer")
    if solution is None and isinstance(answer, str) and ("####" in answer or last_boxed(answer)):
        solution, answer = answer, None
    if solution is not None and not isinstance(solution, str):
        raise ThinklingError(f"{where}: 'solution' must be a string")
    final = final_answer(solution, answer)
    if final is None:
        raise ThinklingError(f"{where}: no final answer (need '#### N', a \\boxed{{}} or an 'answer' field)")
    subject = record.get("subject") or record.get("type")
    return Problem(
        id=id,
        prompt=question.strip(),
        answer=final,
        steps=solution_steps(solution) if solution else (),
        difficulty=_difficulty(record),
        tags=(_subject(subject),) if isinstance(subject, str) and subject.strip() else (),
    )


def record_images(record: dict, where: str) -> list:
    """The image paths a record names: `image` (one path) or `images` (a list), not both."""
    if "image" in record and "images" in record:
        raise ThinklingError(f"{where}: give 'image' or 'images', not both")
    if "images" in record:
        if not isinstance(record["images"], list):
            raise ThinklingError(f"{where}: 'images' must be a list of paths")
        return record["images"]
    return [record["image"]] if "image" in record else []


def load_jsonl(path) -> list[Problem]:
    """Every record of a JSONL file; a bad line raises an error naming `file:line`."""
    path = Path(path)
    if not path.is_file():
        raise ThinklingError(f"{path}: no such file")
    problems = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ThinklingError(f"{path}:{number}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ThinklingError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            own_id = record.get("id", record.get("unique_id")) if isinstance(record, dict) else None
            problem_id = str(own_id) if own_id is not None else f"{path.stem}-{number}"
            where = f"{path}:{number}"
            problem = parse_record(record, where, problem_id)
            names = record_images(record, where)
            if names:
                problem = dataclasses.replace(problem, images=tuple(load_image(n, path.parent, where) for n in names))
            problems.append(problem)
    if not problems:
        raise ThinklingError(f"{path}: no problems in the file")
    return problems


@register_task("jsonl")
class JsonlTask(MathTask):
    """GSM8K/MATH-style problems from a local JSONL file; `n` = the first n lines' problems (options: path, skip)."""

    description = "GSM8K/MATH-style problems from a local JSONL file, first n in file order (options: path, skip)"

    def __init__(self, path: str, skip: int = 0, template=False, verbatim: bool = False):
        """`verbatim: true`: each record's `solution` is the whole SFT target as written, its last
        line the answer line. For traces from `thinkling distill`, which are completions a verifier
        already accepted and so end with their own answer line (`A:34` for `chain`, `The answer is
        \\boxed{5}.` for math): without it a second, math-style answer line would be appended."""
        if not isinstance(verbatim, bool):
            raise ThinklingError(f"task 'jsonl': verbatim must be true or false, got {verbatim!r}")
        self.set_scaffold(template)
        self.path = path
        self.verbatim = verbatim
        self.set_skip(skip)

    def load(self):
        problems = load_jsonl(self.path)
        if not self.verbatim:
            return problems
        out = []
        for p in problems:
            lines = [line for line in (p.steps[-1].split("\n") if p.steps else []) if line.strip()]
            if not lines:
                raise ThinklingError(f"{self.path}: record '{p.id}' has no solution (verbatim: true needs one)")
            # the solution's last line is its answer line; the steps are everything before it
            out.append(dataclasses.replace(p, steps=(*p.steps[:-1], *(["\n".join(lines[:-1])] if lines[:-1] else [])),
                                           meta={**p.meta, "answer_line": lines[-1].strip()}))
        return out

    def answer_line(self, problem: Problem) -> str:
        return problem.meta.get("answer_line") or super().answer_line(problem)
