"""A real `dmgn-node` with ``metrics_addr`` set: the endpoint answers, `dmgn status --json`
carries the same registry, and the log file is JSON lines."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dmgn.app.daemon import pid_alive
from tests._deadlines import scaled

pytestmark = pytest.mark.slow


def dmgn(root: Path, *args: str) -> str:
    env = {**os.environ, "DMGN_DATA_DIR": str(root), "DMGN_PASSPHRASE": "metrics-passphrase"}
    env["DMGN_EMBEDDER"] = "hashing"
    done = subprocess.run(
        [sys.executable, "-m", "dmgn.app.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(120),
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def root() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="dmgn-"))
    try:
        yield base / "n"
    finally:
        pid_file = base / "n" / "dmgn-node.pid"
        if pid_file.exists() and pid_alive(pid := int(pid_file.read_text())):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }


def test_daemon_serves_metrics_and_logs_json(root: Path) -> None:
    dmgn(root, "init")
    config = root / "config.json"
    document = json.loads(config.read_text())
    document.update(listen_addr="ws://127.0.0.1:0", mdns=False, metrics_addr="127.0.0.1:0")
    config.write_text(json.dumps(document))
    started = json.loads(dmgn(root, "start", "--json"))
    url = started["metrics_url"]
    assert url.startswith("http://127.0.0.1:")
    before = scrape(url)
    dmgn(root, "add", "a memory for the metrics")
    after = scrape(url)
    assert after["dmgn_memories"] == before["dmgn_memories"] + 1
    assert after["dmgn_memories_added_total"] == before["dmgn_memories_added_total"] + 1
    status = json.loads(dmgn(root, "status", "--json"))
    assert status["metrics"]["dmgn_memories"] == status["memories"] == 1
    dmgn(root, "stop")
    lines = (root / "logs" / "dmgn-node.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert any("ready" in r["msg"] for r in records)
    assert {"ts", "level", "logger", "msg"} <= set(records[0])
