"""Devices of one identity converge: real `dmgn-node` processes on loopback, WebSocket + Noise.

The first data dir is made with `dmgn init`, the others with `dmgn import` of its `dmgn export`;
each listens on its own free port, and the others have the first as their only bootstrap peer
(Zeroconf off, so nothing else could connect them). Changes are made with the real `dmgn` CLI;
state is read through the control socket. Every spawned daemon is killed in teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from dmgn import api
from dmgn.app.control_client import call
from dmgn.app.daemon import is_dmgn_node, pid_alive
from dmgn.paths import DataDir
from tests._deadlines import scaled
from wire.testing import free_port

pytestmark = pytest.mark.slow

PASSPHRASE = "sync-test-passphrase"
#: Changes must reach the other devices "within seconds"; polls give up after this.
CONVERGE_DEADLINE = 20.0


class Device:
    """One data dir, its config, and the `dmgn` commands run against it."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.root = root / name
        self.port = free_port()
        self.address = f"ws://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "DMGN_DATA_DIR": str(self.root),
            "DMGN_PASSPHRASE": PASSPHRASE,
            "DMGN_EMBEDDER": "hashing",
        }
        self.env.pop("DMGN_DEBUG", None)
        self.pids: set[int] = set()

    def run(self, *args: str, timeout: float = 60) -> Any:
        done = subprocess.run(
            [sys.executable, "-m", "dmgn.app.cli", *args, "--json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=scaled(timeout),
        )
        assert done.returncode == 0, f"{self.name}: dmgn {' '.join(args)}: {done.stderr}"
        return json.loads(done.stdout) if done.stdout.strip() else None

    def configure(self, bootstrap: list[str]) -> None:
        path = self.root / "config.json"
        document = json.loads(path.read_text())
        document.update(
            listen_addr=self.address, bootstrap_peers=bootstrap, mdns=False, sync_interval="5s"
        )
        path.write_text(json.dumps(document))

    def start(self) -> None:
        self.pids.add(int(self.run("start")["pid"]))

    def stop(self) -> None:
        self.run("stop")

    def request(self, request: api.AnyRequest) -> dict[str, Any]:
        return call(DataDir(self.root), request)

    def ids(self) -> set[str]:
        results = self.request(api.QueryMemories(recent=True, limit=1000))["results"]
        return {r["id"] for r in results}

    def edges(self, memory_id: str) -> set[tuple[str, str, str]]:
        links = self.request(api.GetMemory(id=memory_id))["links"]
        return {(link["from"], link["to"], link["type"]) for link in links}

    def add(self, text: str) -> str:
        return str(self.run("add", text)["id"])

    def kill_all(self) -> None:
        pid_file = self.root / "dmgn-node.pid"
        candidates = set(self.pids)
        with contextlib.suppress(OSError, ValueError):
            candidates.add(int(pid_file.read_text()))
        for pid in candidates:
            if pid_alive(pid) and is_dmgn_node(pid):
                os.kill(pid, signal.SIGKILL)


def wait_for(what: str, check: Callable[[], bool], deadline: float = CONVERGE_DEADLINE) -> float:
    """Poll ``check`` until it holds; return how long it took."""
    start, deadline = time.monotonic(), scaled(deadline)
    while True:
        try:
            if check():
                return time.monotonic() - start
        except Exception:  # a daemon still starting, or a memory not there yet
            pass
        if time.monotonic() - start > deadline:
            raise AssertionError(f"not within {deadline:g}s: {what}")
        time.sleep(0.1)


def converged(devices: list[Device], expected: set[str]) -> Callable[[], bool]:
    return lambda: all(d.ids() == expected for d in devices)


@contextlib.contextmanager
def identity_devices(count: int) -> Iterator[list[Device]]:
    root = Path(tempfile.mkdtemp(prefix="dmgn-sync-"))  # short: Unix socket paths are limited
    devices = [Device(root, chr(ord("a") + i)) for i in range(count)]
    try:
        first = devices[0]
        first.run("init")
        first.configure([])
        backup = root / "identity.backup"
        first.run("export", "-o", str(backup))
        for device in devices[1:]:
            device.run("import", "-i", str(backup))
            device.configure([first.address])
        for device in devices:
            device.start()
        yield devices
    finally:
        for device in devices:
            device.kill_all()
        shutil.rmtree(root, ignore_errors=True)


def test_two_devices_converge_on_adds_links_and_deletes_and_after_restarts() -> None:
    with identity_devices(2) as (a, b):
        # Each writes its node_addrs into config.json at start.
        assert json.loads((a.root / "config.json").read_text())["node_addrs"] == [a.address]
        assert a.request(api.Status())["identity_id"] == b.request(api.Status())["identity_id"]

        m1 = a.add("laptop: the heron nests by the river")
        m2 = b.add("desktop: the kingfisher dives at dawn")
        wait_for("adds on both sides replicate", converged([a, b], {m1, m2}))
        b.run("link", m2, m1, "--type", "seen-with")
        wait_for("a link made on b reaches a", lambda: (m2, m1, "seen-with") in a.edges(m1))
        m3 = a.add("a note to delete")
        wait_for("m3 reaches b", converged([a, b], {m1, m2, m3}))
        b.run("delete", m3)
        wait_for("a delete made on b reaches a", converged([a, b], {m1, m2}))
        assert a.request(api.Status())["tombstones"] == 1

        peers = b.request(api.Peers())["peers"]
        assert [(p["kind"], p["state"], p["device_id"]) for p in peers][:1] == [
            ("device", "connected", a.request(api.Status())["device_id"])
        ]
        sync = b.request(api.Status())["sync"]
        assert sync["vector"] == a.request(api.Status())["sync"]["vector"]

        # Stopped, changed on the other side, restarted: catches up.
        b.stop()
        m4 = a.add("written while the desktop was off")
        a.run("delete", m2)
        b.start()
        wait_for("b catches up after a restart", converged([a, b], {m1, m4}))

        # The bootstrap peer itself restarts: b redials it.
        a.stop()
        m5 = b.add("written while the laptop was off")
        a.start()
        wait_for("a catches up after its restart", converged([a, b], {m1, m4, m5}))

        # Concurrent adds on both sides while they sync lose nothing.
        with ThreadPoolExecutor(max_workers=8) as pool:
            jobs = [
                pool.submit(d.add, f"concurrent {d.name} {i}") for i in range(6) for d in (a, b)
            ]
            added = {job.result() for job in jobs}
        assert len(added) == 12
        wait_for("concurrent adds converge", converged([a, b], {m1, m4, m5} | added))
        assert (m2, m1, "seen-with") not in b.edges(m1)  # deleted with m2


def test_peers_and_status_fit_80_columns_without_cutting_words() -> None:
    with identity_devices(2) as (a, b):
        wait_for("b connects to a", lambda: b.request(api.Status())["peers"] == 1)
        narrow = {**b.env, "COLUMNS": "80"}

        def shown(command: str) -> str:
            done = subprocess.run(
                [sys.executable, "-m", "dmgn.app.cli", command],
                env=narrow,
                capture_output=True,
                text=True,
                timeout=scaled(60),
            )
            assert done.returncode == 0, done.stderr
            assert all(len(line) <= 80 for line in done.stdout.splitlines()), done.stdout
            return done.stdout

        peers = shown("peers")
        a_device = a.request(api.Status())["device_id"]
        assert f"{a_device[:12]}  device · connected" in peers, peers
        assert f"address    {a.address}" in peers, peers  # whole, on one line
        status = shown("status")
        identity = b.request(api.Status())["identity_id"]
        assert any(line.split() == ["identity_id", identity] for line in status.splitlines())
        assert any(line.split()[:2] == ["listen_addrs", b.address] for line in status.splitlines())


def test_three_devices_converge_through_one_bootstrap_peer() -> None:
    with identity_devices(3) as (a, b, c):
        ma, mb, mc = a.add("from a"), b.add("from b"), c.add("from c")
        wait_for("three-way adds converge", converged([a, b, c], {ma, mb, mc}))
        c.run("link", mc, mb)
        wait_for("c's link reaches b", lambda: (mc, mb, "related") in b.edges(mb))
        b.run("delete", ma)
        wait_for("b's delete reaches a and c", converged([a, b, c], {mb, mc}))
        c.stop()
        md = b.add("while c was off")
        c.start()
        wait_for("c catches up", converged([a, b, c], {mb, mc, md}))
        status = a.request(api.Status())
        assert status["peers"] == 2
        assert all(d["behind_us"] == 0 for d in status["sync"]["devices"] if d["connected"])
