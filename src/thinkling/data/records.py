"""Append-only JSONL files that a killed process can continue: each row is one `write` of a whole
line, flushed to disk, and a half-written last line (the process died mid-write) is dropped on reading."""

from __future__ import annotations

import json
import os
from pathlib import Path

from thinkling.errors import ThinklingError
from thinkling.files import atomic_write_text, disk_error, read_text


def read_records(path: str | Path, key: str = "id") -> list[dict]:
    """The rows of `path` (none when it does not exist); each must be an object with `key`."""
    path = Path(path)
    if path.is_dir():
        raise ThinklingError(f"{path}: is a folder; name a .jsonl file")
    if not path.exists():
        return []
    lines = read_text(path).splitlines(keepends=True)
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):  # cut off by a killed run: redo that row
                atomic_write_text(path, "".join(lines[:-1]))
                break
            raise ThinklingError(f"{path}:{number}: not valid JSON") from None
        if not isinstance(row, dict) or key not in row:
            raise ThinklingError(f"{path}:{number}: expected a JSON object with '{key}'")
        rows.append(row)
    return rows


def append_records(path: str | Path, rows: list[dict]) -> None:
    """Append rows, each as one whole line, and make them durable before returning."""
    if not rows:
        return
    path = Path(path)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise disk_error(path, e) from None
