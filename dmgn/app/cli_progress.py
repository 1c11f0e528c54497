"""The CLI's progress bars: rich, on stderr, gone when the work ends (``transient``).

One helper for every command that shows progress (`dmgn add --jsonl`, `dmgn backup`,
`dmgn restore`): a bar is never shown with --json, where stderr carries only the error line,
and rich is imported only when a bar is shown.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

from dmgn.app.cli_common import Options, console

__all__ = ["Advance", "file_progress", "progress_bar"]

#: What the bar counts, which picks its columns: lines of an input file (with the label and
#: the time left), items out of a total learnt on the way, or bytes (with the speed).
Unit = Literal["lines", "items", "bytes"]


class Advance(Protocol):
    """Report progress: ``done`` so far, and the ``total`` if it is known now (None: as
    before)."""

    def __call__(self, done: float, total: float | None = None) -> None: ...


def not_shown(done: float, total: float | None = None) -> None:
    """Progress reported while no bar is shown (--json, or stderr is no terminal)."""


def _columns(unit: Unit) -> tuple[Any, ...]:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    match unit:
        case "lines":
            return (
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
            )
        case "items":
            return (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        case "bytes":
            return (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn())


@contextlib.contextmanager
def progress_bar(
    options: Options,
    label: str,
    unit: Unit,
    total: float | None,
    *,
    terminal_only: bool = True,
) -> Iterator[Advance]:
    """A bar on stderr while the block runs; yields how to advance it.

    ``terminal_only=False`` leaves the choice to rich when stderr is no terminal (it draws
    nothing there unless told to, e.g. by FORCE_COLOR); `dmgn add --jsonl` has always done so.
    """
    if options.as_json or (terminal_only and not sys.stderr.isatty()):
        yield not_shown
        return
    from rich.progress import Progress

    with Progress(*_columns(unit), console=console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)

        def advance(done: float, total: float | None = None) -> None:
            bar.update(task, completed=done, total=total)

        yield advance


@contextlib.contextmanager
def file_progress(
    options: Options, label: str, watch: Path | None, total: int | None
) -> Iterator[Advance]:
    """A bar of bytes. Either the caller reports bytes done through the function yielded, or
    ``watch`` names a file whose growing size is the progress (a backup written by the
    daemon), polled from a thread while the block runs."""
    with progress_bar(options, label, "bytes", total) as advance:
        if watch is None or advance is not_shown:
            yield advance
            return
        stop = threading.Event()

        def poll() -> None:
            while not stop.wait(0.2):
                with contextlib.suppress(OSError):
                    advance(watch.stat().st_size)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        try:
            yield advance
        finally:
            stop.set()
            poller.join()
