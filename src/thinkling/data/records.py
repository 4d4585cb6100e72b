"""Append-only JSONL record files (difficulty caches, distilled traces) that a killed process can
continue: rows are whole lines synced to disk, and a half-written last line is redone (`files.read_jsonl`)."""

from __future__ import annotations

from pathlib import Path

from thinkling.errors import ThinklingError
from thinkling.files import append_jsonl, read_jsonl


def read_records(path: str | Path, key: str = "id") -> list[dict]:
    """The rows of `path` (none when it does not exist); each must be an object with `key`."""
    rows = []
    for number, row in read_jsonl(path, "valid JSON"):
        if not isinstance(row, dict) or key not in row:
            raise ThinklingError(f"{path}:{number}: expected a JSON object with '{key}'")
        rows.append(row)
    return rows


def append_records(path: str | Path, rows: list[dict]) -> None:
    """Append rows, each as one whole line, and make them durable before returning."""
    append_jsonl(path, rows)
