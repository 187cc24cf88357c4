"""One progress-bar style for every long operation (rich: bar, ETA, live status)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from deepsqueeze.options import printable


class _PlainTextColumn(TextColumn):
    """A text column that shows user text as it is: no markup, control characters escaped."""

    def __init__(self, text_format: str, style: str = "none") -> None:
        super().__init__(text_format, style=style, markup=False)

    def render(self, task: Task) -> Text:
        text = super().render(task)
        return Text(printable(text.plain), style=text.style)


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator[Progress]:
    """A rich Progress showing description, bar, n/total, elapsed, ETA and a ``status`` field.

    Descriptions and status carry user text (model and dataset names, recipe stage names): they
    are shown as plain text, never parsed as rich markup, control characters escaped.
    """
    bar = Progress(
        _PlainTextColumn("{task.description}", style="bold"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        _PlainTextColumn("{task.fields[status]}"),
        disable=not enabled,
        transient=False,
    )
    with bar:
        yield bar
