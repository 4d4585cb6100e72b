"""Chain-of-thought SFT data from teachers, by rejection sampling.

Each teacher (a local model `thinkling.models` can open, or an OpenAI-compatible chat endpoint)
gets up to n tries per question; the first trace whose final answer the task's verifier accepts
is kept, the rest are rejected. Accepted traces go to `out` as `jsonl`-task records (question,
solution, answer), so `train: {name: jsonl, options: {path: out}}` trains on them. Rejections go
to `<out>.rejected.jsonl`, so a restart skips every (question, teacher) already tried. Rows are
written after each batch of questions, once every teacher has answered it: an unreachable
endpoint fails on the first batch, before anything is written.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from thinkling.data.records import append_records, read_records
from thinkling.errors import ThinklingError
from thinkling.models import open_policy
from thinkling.models.base import SamplingParams
from thinkling.progress import bar
from thinkling.rollout.groups import sample_groups
from thinkling.rollout.prompts import check_fits

DEFAULT_SYSTEM = "Solve the problem step by step. End with the final answer as: The answer is \\boxed{ANSWER}."


class LocalTeacher:
    """A saved policy, run folder, model alias or hub id, sampled n times per question."""

    def __init__(self, spec: str, task, max_new_tokens: int, temperature: float, seed: int):
        self.name, self.task = spec, task
        try:
            self.policy = open_policy(spec)
        except ThinklingError as e:  # open_policy names the flag --model
            raise ThinklingError(f"--teacher {spec}: {str(e).removeprefix(f'--model {spec}: ')}") from None
        self.params = SamplingParams(max_new_tokens, temperature, 1.0, None, seed=seed)

    def solve(self, questions: list[tuple[int, object]], tries: int) -> list[tuple[str | None, int]]:
        """(first accepted trace or None, tries used) per (index, problem); question i samples
        from the stream (seed, i), so a restart draws what an uninterrupted run would."""
        check_fits(self.policy, [p for _, p in questions], self.params.max_new_tokens, "distill")
        groups = sample_groups(self.policy, self.task, [(p, None, 0) for _, p in questions], tries, self.params,
                               keys=[i for i, _ in questions])
        out = []
        for grp in groups:
            first = next((n for n, c in enumerate(grp.completions) if c.correct), None)
            out.append((None, tries) if first is None else (grp.completions[first].text, first + 1))
        return out


class EndpointTeacher:
    """An OpenAI-compatible chat endpoint (`http://host:port/v1`, `#model` picks the served model),
    asked one try at a time until a trace verifies. `OPENAI_API_KEY`, when set, is sent as the key."""

    def __init__(self, spec: str, task, max_new_tokens: int, temperature: float, system: str, timeout: float = 120):
        self.name, self.task = spec, task
        url, _, self.model = spec.partition("#")
        self.url = url.rstrip("/") + "/chat/completions"
        self.body = {"model": self.model or "default", "max_tokens": max_new_tokens, "temperature": temperature}
        self.system, self.timeout = system, timeout

    def ask(self, question: str) -> str:
        body = {**self.body, "messages": [{"role": "system", "content": self.system},
                                          {"role": "user", "content": question}]}
        headers = {"Content-Type": "application/json"}
        if os.environ.get("OPENAI_API_KEY"):
            headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
        request = urllib.request.Request(self.url, json.dumps(body).encode(), headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                reply = json.loads(response.read().decode("utf-8"))
            return reply["choices"][0]["message"]["content"] or ""
        except urllib.error.HTTPError as e:
            raise ThinklingError(f"teacher {self.name}: HTTP {e.code} from {self.url} ({e.reason})") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ThinklingError(f"teacher {self.name}: cannot reach {self.url} ({reason})") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise ThinklingError(f"teacher {self.name}: {self.url} did not answer as an OpenAI chat endpoint") from None

    def solve(self, questions, tries):
        out = []
        for _, problem in questions:
            for n in range(1, tries + 1):
                text = self.ask(problem.prompt)
                if self.task.verify(problem, text).correct:
                    out.append((text, n))
                    break
            else:
                out.append((None, tries))
        return out


def make_teacher(spec: str, task, *, max_new_tokens: int, temperature: float, seed: int, system: str):
    if spec.startswith(("http://", "https://")):
        return EndpointTeacher(spec, task, max_new_tokens, temperature, system)
    return LocalTeacher(spec, task, max_new_tokens, temperature, seed)


def acceptance(rows: list[dict]) -> dict[str, dict]:
    """Per teacher: questions tried, traces accepted, acceptance rate, tries per question."""
    stats: dict[str, dict] = {}
    for r in rows:
        s = stats.setdefault(r["teacher"], {"questions": 0, "accepted": 0, "tries": 0})
        s["questions"] += 1
        s["accepted"] += int(r["accepted"])
        s["tries"] += r["tries"]
    for s in stats.values():
        s["acceptance"] = s["accepted"] / s["questions"]
    return stats


def distill(problems, teachers, out: str | Path, *, tries: int, batch_size: int = 16) -> dict[str, dict]:
    """Ask every teacher about every question not yet tried, keep the verified traces; returns
    `acceptance` over the whole file (this run and earlier ones)."""
    if tries < 1:
        raise ThinklingError(f"--tries must be >= 1, got {tries}")
    out = Path(out)
    rejected = out.with_name(out.stem + ".rejected.jsonl")
    done = read_records(out) + read_records(rejected)
    tried = {(str(r["id"]), r["teacher"]) for r in done}
    index = list(enumerate(problems))
    with bar("distill", len(index) * len(teachers)) as advance:
        for start in range(0, len(index), batch_size):
            chunk = index[start : start + batch_size]
            new = []
            for teacher in teachers:
                todo = [(i, p) for i, p in chunk if (p.id, teacher.name) not in tried]
                for (_, p), (text, used) in zip(todo, teacher.solve(todo, tries) if todo else []):
                    row = {"id": p.id, "teacher": teacher.name, "accepted": text is not None, "tries": used,
                           "question": p.prompt, "answer": p.answer}
                    new.append({**row, "solution": text} if text is not None else row)
                advance(len(chunk))
            append_records(out, [r for r in new if r["accepted"]])
            append_records(rejected, [r for r in new if not r["accepted"]])
            done += new
    return acceptance(done)
