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


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's scheduler for ``--dist loadgroup``, made to work: a module whose tests share a
    module-scoped fixture (a namespace LAN, a started daemon, an initialised data dir) runs on
    one worker, where ``load`` spread it over four and each built the fixture again; every
    other test is handed out on its own, as ``load`` does. Those modules go first (xdist's
    ``--loadscope-reorder``, on by default, queues the units with most tests first): they are
    the long work units, and one starting last would decide the wall time.

    xdist's own loadgroup reads ``xdist_group`` marks through a nodeid suffix it sets on
    ``item._nodeid``, which pytest 9 no longer reads: the marks had no effect. The scheduler
    runs in the controller, which collects nothing, so it finds those modules by reading them.
    """
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    root = config.rootpath
    shared: dict[str, bool] = {}

    def is_shared(module: str) -> bool:
        if module not in shared:
            try:
                shared[module] = bool(_SHARED_FIXTURE.search((root / module).read_text()))
            except OSError:
                shared[module] = False
        return shared[module]

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if is_shared(module) else nodeid

    return SharedFixtureScheduling(config, log)
