"""Deadlines for tests that wait on real processes, stretched when the machine is loaded.

A real ``dmgn-node`` start, an offline CLI run or a catch-up takes a few seconds on an idle
2-core machine and several times that when other work shares the cores (CI's four xdist
workers, other sessions). A fixed deadline then fails a test that would have passed: that is
a flaky test, not a finding. :func:`scaled` multiplies a deadline by :func:`slowdown`:

- ``DMGN_TEST_SLOWDOWN`` when set (a CI machine known to be slow, or a debugging session that
  wants short deadlines: ``1``);
- otherwise the 1-minute load average per core, at least 1 and at most :data:`MAX_SLOWDOWN`,
  read when the wait starts, so a wait that starts under load gets the longer deadline.

The cap keeps a hung process failing well inside pytest's 600 s ``--timeout`` (a 60 s deadline
becomes at most 240 s). Speed itself is never asserted with these: benchmarks measure it.
"""

from __future__ import annotations

import os

__all__ = ["MAX_SLOWDOWN", "scaled", "slowdown"]

#: The largest factor the load average can give.
MAX_SLOWDOWN = 4.0
#: The environment variable that overrides the load average (a float, at least 1).
ENVIRONMENT = "DMGN_TEST_SLOWDOWN"


def slowdown() -> float:
    """How many times slower than an idle machine waits may be now (1 to MAX_SLOWDOWN)."""
    given = os.environ.get(ENVIRONMENT)
    if given:
        return max(1.0, float(given))
    try:
        per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        return 1.0
    return min(MAX_SLOWDOWN, max(1.0, per_core))


def scaled(seconds: float) -> float:
    """``seconds`` for an idle machine, stretched by the current :func:`slowdown`."""
    return seconds * slowdown()
