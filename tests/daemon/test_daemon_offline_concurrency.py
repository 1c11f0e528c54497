"""Several offline commands at once (no daemon): they take turns on the data dir lock.

Real processes: the `dmgn` console script, started together.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._deadlines import scaled

pytestmark = pytest.mark.slow

DMGN = Path(sys.executable).with_name("dmgn")
WRITERS = 3


@pytest.fixture
def env() -> Iterator[dict[str, str]]:
    root = Path(tempfile.mkdtemp(prefix="dmgn-"))
    environment = {
        **os.environ,
        "DMGN_DATA_DIR": str(root / "data"),
        "DMGN_PASSPHRASE": "offline-concurrency",
        "DMGN_EMBEDDER": "hashing",
    }
    environment.pop("DMGN_DEBUG", None)
    done = subprocess.run(
        [str(DMGN), "init"], env=environment, capture_output=True, timeout=scaled(60)
    )
    assert done.returncode == 0, done.stderr
    try:
        yield environment
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_concurrent_offline_adds_wait_for_the_lock_instead_of_failing(env: dict[str, str]) -> None:
    writers = [
        subprocess.Popen(
            [str(DMGN), "add", f"memory {n}", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(WRITERS)
    ]
    outcomes = [w.communicate(timeout=scaled(120)) for w in writers]
    failures = [err for w, (_, err) in zip(writers, outcomes, strict=True) if w.returncode != 0]
    assert not failures, failures
    listed = subprocess.run(
        [str(DMGN), "query", "--recent", "--limit", "10", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(60),
    )
    assert listed.returncode == 0, listed.stderr
    stored = {
        hit.get("snippet") or hit.get("content") for hit in json.loads(listed.stdout)["results"]
    }
    assert stored >= {f"memory {n}" for n in range(WRITERS)}, stored
