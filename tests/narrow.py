"""Render a rich renderable the way a log, a pipe or CI sees it: 80 columns, no terminal."""

from __future__ import annotations

import io

from rich.console import Console

WIDTH = 80  # what rich falls back to when stdout is not a terminal and COLUMNS is unset


def render80(render) -> str:
    """The text `render(console)` prints on an 80-column console that is not a terminal."""
    console = Console(file=io.StringIO(), width=WIDTH, force_terminal=False, color_system=None)
    render(console)
    return console.file.getvalue()


def assert_readable(text: str, values: list[str]) -> None:
    """No cell cut short (rich marks a cut with '…'), no line wider than the console, every value whole."""
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= WIDTH, text
    missing = [v for v in values if v not in text]
    assert not missing, f"{missing} split or missing in:\n{text}"
