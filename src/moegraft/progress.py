"""The rich progress bar of every long-running library call (silent when disabled).

In: a total and per-step advances, optionally a line of text that changes with each. Out: a live bar on stderr:
description, bar, done / total (or bytes and speed), elapsed, remaining, and that text.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as _RichProgress
from rich.table import Column


class Progress:
    """Context manager: `with Progress(total, "convert", unit="B") as bar: bar.advance(n)`.

    With `info=True` the bar ends in a text field: `bar.advance(1, info="loss 2.31")` (the training bar).
    `done`: how much was already done before this bar (a resumed run).
    """

    def __init__(
        self,
        total: float,
        description: str,
        *,
        enabled: bool = True,
        unit: str = "it",
        info: bool = False,
        done: float = 0,
    ):
        self.enabled = enabled
        if not enabled:
            return
        cols = [TextColumn("[bold]{task.description}"), BarColumn()]
        cols += [DownloadColumn(), TransferSpeedColumn()] if unit == "B" else [MofNCompleteColumn()]
        cols += [TimeElapsedColumn(), TimeRemainingColumn()]
        # the info wraps rather than squeezing the counts to '…' on a narrow console (a log, CI: 80 columns)
        if info:
            cols.append(
                TextColumn("{task.fields[info]}", table_column=Column(no_wrap=False, overflow="fold"))
            )
        self._bar = _RichProgress(*cols, console=Console(stderr=True), transient=False)
        self._task = self._bar.add_task(description, total=total, completed=done, info="")

    def __enter__(self) -> Progress:
        if self.enabled:
            self._bar.__enter__()
        return self

    def advance(self, n: float = 1, **fields) -> None:
        if self.enabled:
            self._bar.update(self._task, advance=n, **fields)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._bar.__exit__(*exc)
