"""Reading and writing the project's own files so that a bad or half-written file is one clear
error naming it, and a crash never leaves half a file behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from thinkling.errors import ThinklingError


def read_text(path: str | Path) -> str:
    """A UTF-8 text file; bytes that are not UTF-8 are an error naming the file and line."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ThinklingError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x})") from None


def read_json(path: str | Path) -> dict:
    """A JSON object from a file, or one error naming the file."""
    path = Path(path)
    try:
        data = json.loads(read_text(path))
    except (OSError, json.JSONDecodeError) as e:
        raise ThinklingError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ThinklingError(f"{path}: expected a JSON object")
    return data


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write through a temporary file and a rename: readers see the old file or the new one."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """`atomic_write_text` for binary files (tensors)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise disk_error(path, e) from None


@contextmanager
def staged_folder(target: str | Path) -> Iterator[Path]:
    """A folder written beside `target` and renamed to it when the block ends: a crash or an error
    never leaves a half-written folder that looks finished (the temporary one is removed)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def disk_error(path, error: Exception) -> ThinklingError:
    """The one-line error for a write that failed (a full disk says so)."""
    full = isinstance(error, OSError) and error.errno == errno.ENOSPC
    return ThinklingError(f"cannot write {path}: " + ("no space left on device" if full else str(error)))


def read_jsonl(path: str | Path, what: str = "JSON") -> list[tuple[int, object]]:
    """(line number, value) of each non-blank line of an append-only JSONL file; none when it does
    not exist. A half-written last line (its writer was killed mid-write) is cut from the file so the
    row is redone; any other unparsable line is an error naming the file, the line and `what` it
    should have been."""
    path = Path(path)
    if path.is_dir():
        raise ThinklingError(f"{path}: is a folder; name a .jsonl file")
    if not path.exists():
        return []
    lines = read_text(path).splitlines(keepends=True)
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append((number, json.loads(line)))
        except json.JSONDecodeError:
            if number == len(lines) and not line.endswith("\n"):
                atomic_write_text(path, "".join(lines[:-1]))
                break
            raise ThinklingError(f"{path}:{number}: not {what}") from None
    return out


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """The whole file at once, atomically: a reader sees the old rows or all the new ones."""
    atomic_write_text(path, jsonl_text(rows))


def append_jsonl(path: str | Path, rows: list[dict], durable: bool = True) -> None:
    """Append rows, each as one whole line; `durable` syncs them to disk before returning."""
    if not rows:
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(jsonl_text(rows))
            if durable:
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        raise disk_error(path, e) from None
