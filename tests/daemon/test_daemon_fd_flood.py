"""A remote TCP flood cannot take the descriptors the store needs (issue 12 item 6).

A real `dmgn-node` runs with ``ulimit -n 256``; 400 plain TCP connections (from 50 loopback
addresses, never speaking HTTP) are held open against its WebSocket port; local writes must
still succeed and the daemon must stay under its descriptor limit.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmgn import api

sys.path.insert(0, str(Path(__file__).parents[1] / "sync"))
from test_sync_processes import Device

from tests._deadlines import scaled

pytestmark = pytest.mark.slow

FD_LIMIT = 256


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def start_limited(device: Device) -> int:
    done = subprocess.run(
        [sys.executable, "-m", "dmgn.app.cli", "start", "--json"],
        env=device.env,
        capture_output=True,
        text=True,
        timeout=scaled(120),
        preexec_fn=_limited,
    )
    assert done.returncode == 0, done.stderr
    pid = int(json.loads(done.stdout)["pid"])
    device.pids.add(pid)
    return pid


@contextlib.contextmanager
def flood(port: int, count: int) -> Iterator[list[socket.socket]]:
    sockets: list[socket.socket] = []
    try:
        for i in range(count):
            sock = socket.socket()
            sock.bind((f"127.0.1.{10 + i % 50}", 0))
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError, OSError):
                sock.connect(("127.0.0.1", port))
            sockets.append(sock)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def test_local_writes_succeed_while_a_tcp_flood_hits_a_node_with_256_descriptors() -> None:
    root = Path(tempfile.mkdtemp(prefix="dmgn-fd-"))
    device = Device(root, "a")
    try:
        device.run("init")
        device.configure([])
        pid = start_limited(device)
        with flood(device.port, 400):
            time.sleep(1)  # let the node accept (and shed) what it will
            most = 0
            for i in range(5):
                most = max(most, len(os.listdir(f"/proc/{pid}/fd")))
                start = time.monotonic()
                device.add(f"written during the flood {i}")
                # At once: not after the flood's connections time out (an add that cannot reach
                # the daemon waits for it up to 30 s).
                assert time.monotonic() - start < 5
            # The network's share (256 - FD_RESERVE) is taken; the reserve is not.
            assert most <= FD_LIMIT - 64
            assert len(device.ids()) == 5
            assert device.request(api.Status())["memories"] == 5
    finally:
        device.kill_all()
        shutil.rmtree(root, ignore_errors=True)
