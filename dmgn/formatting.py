"""Short text in the service's answers: a memory's snippet and a coarse age.

Every interface (CLI, control socket, MCP, REST) shows what the service answers, so these are
shaped once, here, rather than by each renderer. Pure functions of their arguments.
"""

from __future__ import annotations

__all__ = ["SNIPPET_CHARS", "snippet", "time_ago"]

#: Characters of a memory that a query result shows without ``include_content``.
SNIPPET_CHARS = 200


def snippet(content: str, words: list[str]) -> str:
    """A window of the content around the first matched word (or its start)."""
    flat = " ".join(content.split())
    if len(flat) <= SNIPPET_CHARS:
        return flat
    lower = flat.lower()
    hits = [i for i in (lower.find(w) for w in words) if i >= 0]
    start = max(0, min(hits) - SNIPPET_CHARS // 4) if hits else 0
    piece = flat[start : start + SNIPPET_CHARS]
    return ("…" if start else "") + piece + ("…" if start + SNIPPET_CHARS < len(flat) else "")


def time_ago(delta_ns: int) -> str:
    """``delta_ns`` in its largest whole unit: "3d ago", "5h ago", "12m ago", "40s ago"."""
    seconds = max(0, delta_ns // 1_000_000_000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"
