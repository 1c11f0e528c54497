"""Shared fixtures."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import trio.testing

# The model's onnxruntime graph is built once and cached (dmgn.embedding): keep the tests' copy
# out of the user's cache dir, and share it between test runs and the daemons tests start.
os.environ.setdefault(
    "DMGN_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"dmgn-test-cache-{os.getuid()}")
)


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


#: A module-scoped (or package-scoped) fixture defined in a test module.
_SHARED_FIXTURE = re.compile(r"@pytest\.fixture\(\s*scope\s*=\s*[\"'](module|package)[\"']")
#: A module whose tests start processes (the CLI, dmgn-node, a scenario) or are marked slow.
_LONG_TESTS = re.compile(r"\bsubprocess\b|pytest\.mark\.slow")


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's scheduler for ``--dist loadgroup``, made to work: a module whose tests share a
    module-scoped fixture (a namespace LAN, a started daemon, an initialised data dir) runs on
    one worker, where ``load`` spread it over four and each built the fixture again; every
    other test is handed out on its own, as ``load`` does.

    The long work goes first, so that quick tests fill the end of the run instead of one
    20-40 s test (the storage and sync scenarios came last, in collection order) running on
    one worker while the others have nothing left: those shared modules (largest first), then
    the tests of modules that start processes or are marked slow, then the rest, each group in
    collection order.

    xdist's own loadgroup reads ``xdist_group`` marks through a nodeid suffix it sets on
    ``item._nodeid``, which pytest 9 no longer reads: the marks had no effect. The scheduler
    runs in the controller, which collects nothing, so it finds those modules by reading them.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    root = config.rootpath
    kinds: dict[str, int] = {}

    def kind(module: str) -> int:
        """0: shares a module fixture, 1: long tests, 2: the rest."""
        if module not in kinds:
            try:
                source = (root / module).read_text()
            except OSError:
                source = ""
            kinds[module] = (
                0 if _SHARED_FIXTURE.search(source) else 1 if _LONG_TESTS.search(source) else 2
            )
        return kinds[module]

    class SharedFixtureScheduling(LoadScopeScheduling):
        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if kind(module) == 0 else nodeid

        def _assign_work_unit(self, node: Any) -> None:
            if not self.ordered:  # the queue is complete before the first unit goes out
                self.ordered = True
                units = sorted(
                    self.workqueue.items(),
                    key=lambda unit: (kind(unit[0].split("::", 1)[0]), -len(unit[1])),
                )
                self.workqueue.clear()
                self.workqueue.update(units)
            super()._assign_work_unit(node)

    return SharedFixtureScheduling(config, log)
