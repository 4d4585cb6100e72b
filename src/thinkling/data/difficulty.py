"""Measured difficulty: 1 − the pass rate of a reference policy over k sampled completions.

Generators know their difficulty (chain's step count, MATH's level), but a file of questions
usually does not, and what is hard for one model is not for another. `measure_difficulty`
writes one row per problem id to a JSONL file as it goes; rerunning continues where it
stopped (a problem already in the file is never measured again), and `curriculum.difficulty_file`
reads the file back for the samplers.
"""

from __future__ import annotations

from pathlib import Path

from thinkling.data.records import append_records, read_records
from thinkling.errors import ThinklingError
from thinkling.models.base import SamplingParams
from thinkling.progress import bar, console
from thinkling.rollout.groups import sample_groups
from thinkling.rollout.prompts import check_fits


def pass_rate_difficulty(right: int, samples: int) -> float:
    """1 − right / samples: 0 = always solved, 1 = never."""
    return 1.0 - right / samples


def measure_difficulty(policy, task, problems, out: str | Path, *, model: str, samples: int, max_new_tokens: int,
                       temperature: float, seed: int, batch_size: int) -> list[dict]:
    """Measure every problem not yet in `out` and append its row; returns all rows of the file.

    Problem i samples from the stream (seed, i), so a measurement interrupted and continued
    equals one run straight through. A file measured with another model or other sampling
    settings is refused rather than mixed.
    """
    if samples < 1:
        raise ThinklingError(f"--samples must be >= 1, got {samples}")
    settings = {"model": model, "samples": samples, "temperature": temperature, "max_new_tokens": max_new_tokens,
                "seed": seed}
    rows = read_records(out)
    for number, row in enumerate(rows, start=1):
        changed = [k for k in settings if row.get(k) != settings[k]]
        if changed:
            raise ThinklingError(f"{out}:{number}: measured with other settings ({', '.join(changed)}); "
                                 "use another --out or the same settings")
    done = {str(r["id"]) for r in rows}
    todo = [(i, p) for i, p in enumerate(problems) if p.id not in done]
    if rows:
        console.print(f"continuing: {len(done)} problems already measured in {out}")
    check_fits(policy, [p for _, p in todo], max_new_tokens, "difficulty")
    params = SamplingParams(max_new_tokens, temperature, 1.0, None, seed=seed)
    per_batch = max(1, batch_size // samples)
    with bar("difficulty", len(todo)) as advance:
        for start in range(0, len(todo), per_batch):
            chunk = todo[start : start + per_batch]
            groups = sample_groups(policy, task, [(p, None, 0) for _, p in chunk], samples, params,
                                   keys=[i for i, _ in chunk])
            new = []
            for grp in groups:
                right = sum(c.correct for c in grp.completions)
                new.append({"id": grp.problem.id, "difficulty": pass_rate_difficulty(right, samples), "right": right,
                            "task_difficulty": grp.problem.difficulty, **settings})
            append_records(out, new)
            rows += new
            advance(len(chunk))
    return rows
