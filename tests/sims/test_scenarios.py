"""The sim scenarios run the production actors to convergence (virtual time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trio.testing

from sims.__main__ import AUTOJUMP_THRESHOLD
from sims.scenarios import disk_loss, partition_heal


def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=AUTOJUMP_THRESHOLD)


def test_partition_then_heal_converges_and_the_delete_wins() -> None:
    # partition_heal itself raises if any device still holds the memory deleted during the
    # partition, or if the devices do not converge within the deadline.
    result = trio.run(lambda: partition_heal(seed=3, devices=3, per_device=5), clock=clock())
    assert result.metrics["memories"] == 3 * 5 + 2 * 5 - 1
    assert result.metrics["converge_after_heal_s"] < 60
    assert result.metrics["wire_bytes_total"] > 0


def test_a_replaced_device_gets_everything_back() -> None:
    result = trio.run(lambda: disk_loss(seed=2, per_device=8), clock=clock())
    assert result.metrics["memories"] == 16
    assert max(n for _, device, n in result.timeline if device == "new-desktop") == 16


def test_python_m_sims_writes_json_and_png(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "sims", "disk_loss", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    document = json.loads((tmp_path / "disk_loss.json").read_text())
    assert document["metrics"]["memories"] == 60
    assert (tmp_path / "disk_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
