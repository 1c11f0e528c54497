"""`dmgn start` waits for a daemon that takes long to start but says it is still starting.

The daemon side is a stand-in process (a real process, a real control socket) so the start can
be made slower than the timeout on purpose; the real daemon's beats are the same calls.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmgn.app import daemon
from dmgn.errors import DaemonUnavailable
from dmgn.paths import DataDir

ROOT = Path(__file__).resolve().parents[2]
PHASE = "replaying the write-ahead log"

STAND_IN = """
import os, socket, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from dmgn.app.daemon import write_start_status
from dmgn.control_protocol import FrameDecoder, decode_request, encode_ok
from dmgn.paths import DataDir

data_dir, starting_for, mode = DataDir(Path(sys.argv[2])), float(sys.argv[3]), sys.argv[4]
write_start_status(data_dir, sys.argv[5])
if mode == "silent":  # alive, but never says anything again
    time.sleep(120)
    sys.exit(0)
end = time.monotonic() + starting_for
while time.monotonic() < end:
    write_start_status(data_dir, sys.argv[5])
    time.sleep(0.2)
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(str(data_dir.control_socket))
server.listen()
while True:
    connection, _ = server.accept()
    with connection:
        decoder = FrameDecoder()
        while data := connection.recv(65536):
            for payload in decoder.receive_data(data):
                request = decode_request(payload)
                connection.sendall(encode_ok(request.id, {"pid": os.getpid()}))
"""


@pytest.fixture
def data_dir() -> Iterator[DataDir]:
    root = Path(tempfile.mkdtemp(prefix="dmgn-"))  # short: socket paths are limited to 107 bytes
    directory = DataDir(root / "data")
    directory.ensure()
    yield directory
    shutil.rmtree(root, ignore_errors=True)


def stand_in(data_dir: DataDir, starting_for: float, mode: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-c", STAND_IN, str(ROOT), str(data_dir.root)]
    return subprocess.Popen(
        [*argv, str(starting_for), mode, PHASE],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_a_daemon_that_keeps_saying_it_is_starting_is_waited_for(data_dir: DataDir) -> None:
    process = stand_in(data_dir, starting_for=5.0, mode="beats")
    heard: list[str] = []
    try:
        _wait_until_it_speaks(data_dir, process)
        began = time.monotonic()
        facts = daemon.wait_until_ready(data_dir, process, timeout=1.5, on_progress=heard.append)
        assert facts["pid"] == process.pid
        assert time.monotonic() - began > 4.0  # well past the 1.5 s timeout
        assert heard == [PHASE]  # the person is told what takes so long
    finally:
        process.kill()
        process.wait()


def test_a_daemon_that_goes_silent_is_given_up_on_naming_what_it_was_doing(
    data_dir: DataDir,
) -> None:
    process = stand_in(data_dir, starting_for=0.0, mode="silent")
    try:
        _wait_until_it_speaks(data_dir, process)
        began = time.monotonic()
        with pytest.raises(DaemonUnavailable, match=f"no sign of progress for 1.5s .*{PHASE}"):
            daemon.wait_until_ready(data_dir, process, timeout=1.5)
        assert time.monotonic() - began < 30
    finally:
        process.kill()
        process.wait()


def _wait_until_it_speaks(data_dir: DataDir, process: subprocess.Popen[bytes]) -> None:
    """The stand-in's own Python start-up may take seconds on a busy machine: what a test
    measures starts once it has said what it is doing."""
    said = time.monotonic() + 60
    while daemon.read_start_status(data_dir, process.pid) is None:
        assert time.monotonic() < said and process.poll() is None
        time.sleep(0.05)
