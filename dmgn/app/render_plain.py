"""People's output for `dmgn status` without rich (issue 17: rich costs tens of milliseconds of
start-up, and status through the daemon should cost little more than Python itself).

The layout is the one the rich tables gave: a column of keys, the values beside them (a value
too long for the terminal wraps under itself), each nested mapping ("index", "dht"...) a section
of its own indented by two with its own key width, and the sync vector as a small table. Keys
and headings are bold on a terminal; values are printed as they are (no markup is interpreted).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import IO, Any

__all__ = ["lag", "render_status", "seconds_ago", "terminal_width"]

_BOLD, _RED, _RESET = "\x1b[1m", "\x1b[31m", "\x1b[0m"


def terminal_width() -> int:
    """The width rich would use: $COLUMNS, else the terminal of stdin/stdout/stderr, else 80."""
    width = 0
    for fd in (0, 1, 2):
        try:
            width = os.get_terminal_size(fd).columns
        except (OSError, ValueError):
            continue
        break
    columns = os.environ.get("COLUMNS")
    if columns is not None and columns.isdigit():
        width = int(columns)
    return width or 80


def _styled(out: IO[str]) -> bool:
    if os.environ.get("FORCE_COLOR"):
        return True
    if os.environ.get("TERM", "").lower() in ("dumb", "unknown"):
        return False
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty())


def seconds_ago(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if value >= size:
            return f"{value / size:.0f}{unit} ago"
    return f"{value:.0f}s ago"


def lag(behind: int | None, ahead: int | None, in_sync: bool | None = None) -> str:
    """``in_sync``: the version vectors match (issue 20: the counts alone said "in sync"
    during a partition, while each side held ops the other lacked)."""
    if behind is None and ahead is None:
        return "-"
    if in_sync:
        return "in sync"
    if not behind and not ahead:
        return "not confirmed" if in_sync is False else "in sync"
    parts = []
    if behind:
        parts.append(f"lacks {behind}")
    if ahead:
        parts.append(f"has {ahead} new")
    return ", ".join(parts)


def _plain(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return "-" if value is None else str(value)


def _wrap(text: str, width: int) -> list[str]:
    """Lines of at most ``width`` characters: broken at spaces, a longer word cut (rich's
    "fold"), a newline kept."""
    width = max(width, 1)
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if len(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while len(word) > width:
                lines.append(word[:width])
                word = word[width:]
            line = word
        lines.append(line)
    return lines


class _Printer:
    def __init__(self, out: IO[str], width: int) -> None:
        self.out = out
        self.width = width
        self.styled = _styled(out)
        self.color = self.styled and "NO_COLOR" not in os.environ

    def bold(self, text: str) -> str:
        return f"{_BOLD}{text}{_RESET}" if self.styled else text

    def red(self, text: str) -> str:
        return f"{_RED}{text}{_RESET}" if self.color else text

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")

    def key_values(self, rows: list[tuple[str, str]], key_width: int, indent: int) -> None:
        width = max([key_width, *(len(key) for key, _ in rows)])
        room = self.width - indent - width - 2
        for key, value in rows:
            first, *rest = _wrap(value, room)
            self.line(f"{' ' * indent}{self.bold(key.ljust(width))}  {first}".rstrip())
            for more in rest:
                self.line(f"{' ' * (indent + width + 2)}{more}".rstrip())

    def table(self, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
        widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]

        def cells(row: tuple[str, ...], style: Callable[[str], str]) -> str:
            return "".join(f" {style(c.ljust(w))} " for c, w in zip(row, widths, strict=True))

        self.line(cells(header, self.bold).rstrip())
        for row in rows:
            self.line(cells(row, str).rstrip())


def render_status(response: dict[str, Any], out: IO[str] | None = None) -> None:
    """`dmgn status` for people; ``metrics`` are for programs (``--json``, Prometheus)."""
    printer = _Printer(out or sys.stdout, terminal_width())
    shown = {k: v for k, v in response.items() if k not in ("sync", "metrics")}
    width = max((len(k) for k, v in shown.items() if not isinstance(v, dict)), default=0)
    rows: list[tuple[str, str]] = []
    for key, value in shown.items():
        if isinstance(value, dict):
            if rows:
                printer.key_values(rows, width, 0)
                rows = []
            printer.line(printer.bold(key))
            printer.key_values([(k, _plain(v)) for k, v in value.items()], 0, 2)
        else:
            rows.append((key, _plain(value)))
    if rows:
        printer.key_values(rows, width, 0)
    sync = response.get("sync")
    if not sync:
        return
    printer.line()
    printer.line(f"{printer.bold('sync')}  {sync['feed_entries']} feed entries; our vector:")
    devices = {d["device_id"]: d for d in sync["devices"]}
    table: list[tuple[str, ...]] = []
    for device in sorted(set(sync["vector"]) | set(devices)):
        info = devices.get(device)
        me = " (this device)" if device == sync["device_id"] else ""
        table.append(
            (
                device[:12] + me,
                str(sync["vector"].get(device, 0)),
                "-" if info is None else ("yes" if info["connected"] else "no"),
                "-"
                if info is None
                else lag(info["behind_us"], info["ahead_of_us"], info.get("in_sync")),
                "-" if info is None else seconds_ago(info["last_sync_s_ago"]),
            )
        )
    if table:
        printer.table(("device", "our copy (seq)", "connected", "lag", "last sync"), table)
    else:
        printer.line("no feed entries or devices yet")
    if sync.get("last_apply_error"):
        for text in _wrap(f"last apply error: {sync['last_apply_error']}", printer.width):
            printer.line(text.replace("last apply error:", printer.red("last apply error:"), 1))
