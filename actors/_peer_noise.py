"""Rate-limited, summarised logging of what peers get wrong (private helper, not an actor).

Strangers can send us as many malformed frames, failed handshakes and junk datagrams as they
like. Logging each one at ERROR with a traceback let about 65k junk UDP datagrams rotate away
every log file (issue 12 item 8). The rule here: protocol noise from peers is logged at WARNING
at most, without a traceback, and each kind of noise at most once per `SUMMARY_INTERVAL`; what
was suppressed is counted and reported in the next line of that kind ("... and 812 more in the
last 60 s").

The clock is injectable so the actors using this keep working under trio's MockClock and the
DHT's own asyncio thread (it takes ``time.monotonic`` there). Not thread-safe: one instance
per thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["MAX_KINDS", "SUMMARY_INTERVAL", "PeerNoise"]

#: One line per kind of peer fault per minute: enough to see an attack start and what it is,
#: few enough that a flood of millions of bad packets writes ~1 KiB a minute.
SUMMARY_INTERVAL = 60.0
#: Distinct kinds tracked; kinds are chosen by our code (not by peers), so this only guards
#: against a programming error that makes the kind depend on peer data.
MAX_KINDS = 256


@dataclass(slots=True)
class _Kind:
    last_logged: float
    suppressed: int = 0


class PeerNoise:
    """Logs peer faults by kind: the first at once, then at most one line per interval."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        level: int = logging.WARNING,
        interval: float = SUMMARY_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._level = min(level, logging.WARNING)
        self._interval = interval
        self._clock = clock
        self._kinds: dict[str, _Kind] = {}
        self.total = 0

    def report(self, kind: str, message: str, *args: object, level: int | None = None) -> None:
        """Log ``message % args`` unless a line of this ``kind`` was logged recently
        (``level`` lowers this kind's level below the default; never above WARNING)."""
        self.total += 1
        now = self._clock()
        state = self._kinds.get(kind)
        if state is not None and now - state.last_logged < self._interval:
            state.suppressed += 1
            return
        if state is None and len(self._kinds) >= MAX_KINDS:
            self._kinds.clear()
        suppressed = state.suppressed if state is not None else 0
        self._kinds[kind] = _Kind(now)
        if suppressed:
            message += f" (and {suppressed} more like it in the last {self._interval:g} s)"
        chosen = self._level if level is None else min(level, logging.WARNING)
        self._log.log(chosen, message, *args)
