"""Shared fixtures."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
