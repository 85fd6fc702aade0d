"""A small rich progress bar used by long-running library calls (silent when disabled).

In: a total and per-step advances. Out: a live bar on stderr.
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


class Progress:
    """Context manager: `with Progress(total, "convert", unit="B") as bar: bar.advance(n)`."""

    def __init__(self, total: float, description: str, *, enabled: bool = True, unit: str = "it"):
        self.enabled = enabled
        if not enabled:
            return
        cols = [TextColumn("[bold]{task.description}"), BarColumn()]
        cols += [DownloadColumn(), TransferSpeedColumn()] if unit == "B" else [MofNCompleteColumn()]
        cols += [TimeElapsedColumn(), TimeRemainingColumn()]
        self._bar = _RichProgress(*cols, console=Console(stderr=True), transient=False)
        self._task = self._bar.add_task(description, total=total)

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
