"""One progress-bar style for every long operation (rich: bar, ETA, live status)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress]:
    """A rich Progress showing description, bar, n/total, elapsed, ETA and a ``status`` field.

    Descriptions and status carry user text (model and dataset names, recipe stage names): they
    are shown as plain text, never parsed as rich markup.
    """
    bar = Progress(
        TextColumn("{task.description}", style="bold", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}", markup=False),
        disable=not enabled,
        transient=False,
    )
    with bar:
        yield bar
