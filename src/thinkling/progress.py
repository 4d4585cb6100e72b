"""Live progress bars (rich) that degrade to nothing when output is not a terminal."""

from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


@contextlib.contextmanager
def bar(description: str, total: int):
    """Yield `advance(n=1, **fields)`; a rich bar on a terminal, silent otherwise (CI, pipes)."""
    if not sys.stderr.isatty():
        yield lambda n=1, **fields: None
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")

        def advance(n=1, info: str = ""):
            progress.update(task, advance=n, info=info)

        yield advance
