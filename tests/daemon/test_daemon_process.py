"""The real `dmgn-node` process driven by the real `dmgn` CLI, each in its own data dir.

Every spawned daemon is killed in teardown, whatever the test did.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmgn.app.daemon import is_dmgn_node, pid_alive
from tests._deadlines import scaled
from tests._processes import exited

pytestmark = pytest.mark.slow

PASSPHRASE = "daemon-test-passphrase"
MCP_INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"},
    },
}


class Node:
    """A data dir and the `dmgn` commands run against it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {
            **os.environ,
            "DMGN_DATA_DIR": str(root),
            "DMGN_PASSPHRASE": PASSPHRASE,
            "COLUMNS": "200",
        }
        self.env.pop("DMGN_DEBUG", None)
        self.pids: set[int] = set()

    def run(
        self, *args: str, ok: bool = True, timeout: float = 60, input: str = ""
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "dmgn.app.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=scaled(timeout),
            input=input,
        )
        if ok:
            assert done.returncode == 0, done.stderr
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)

    def start(self) -> int:
        pid = int(self.json("start")["pid"])
        self.pids.add(pid)
        return pid

    @property
    def pid_file(self) -> Path:
        return self.root / "dmgn-node.pid"

    @property
    def socket(self) -> Path:
        return self.root / "control.sock"

    def kill_all(self) -> None:
        candidates = set(self.pids)
        if self.pid_file.exists():
            candidates.add(int(self.pid_file.read_text()))
        for pid in candidates:
            if pid_alive(pid) and is_dmgn_node(pid):
                os.kill(pid, signal.SIGKILL)
                wait_gone(pid)


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while not exited(pid):  # a zombie counts: init reaps our daemons seconds later
        assert time.monotonic() < deadline, f"pid {pid} did not exit"
        time.sleep(0.02)


@pytest.fixture
def node() -> Iterator[Node]:
    root = Path(tempfile.mkdtemp(prefix="dmgn-"))  # short: socket paths are limited to 107 bytes
    node = Node(root / "data")
    node.run("init")
    # Loopback only, any free port, no LAN multicast: tests send nothing beyond this machine
    # and never collide on a port.
    config = node.root / "config.json"
    document = json.loads(config.read_text())
    document.update(listen_addr="ws://127.0.0.1:0", mdns=False)
    config.write_text(json.dumps(document))
    try:
        yield node
    finally:
        node.kill_all()
        shutil.rmtree(root, ignore_errors=True)


def test_start_add_query_stop_start_again_keeps_the_data(node: Node) -> None:
    pid = node.start()
    assert is_dmgn_node(pid)
    assert node.pid_file.read_text().strip() == str(pid)
    assert node.socket.stat().st_mode & 0o777 == 0o600
    added = node.json("add", "the daemon keeps this")
    hits = node.json("query", "daemon")["results"]
    assert [h["id"] for h in hits] == [added["id"]]
    # An AI tool's `dmgn mcp` reaches the daemon's MCP bridge.
    mcp = node.run("mcp", "--data-dir", str(node.root), input=json.dumps(MCP_INITIALIZE) + "\n")
    assert json.loads(mcp.stdout.splitlines()[0])["result"]["serverInfo"]

    stopped = node.json("stop")
    assert stopped["was_running"] and stopped["pid"] == pid
    wait_gone(pid)
    assert not node.pid_file.exists() and not node.socket.exists()
    assert not (node.root / "mcp.sock").exists()
    assert not (node.root / "memories.duckdb.wal").exists()  # checkpointed on the way out

    second = node.start()
    assert second != pid
    status = node.json("status")
    assert (status["mode"], status["memories"]) == ("daemon", 1)
    assert [h["id"] for h in node.json("query", "daemon")["results"]] == [added["id"]]
    node.run("stop")
    wait_gone(second)


def test_commands_print_the_same_through_the_daemon_as_offline(node: Node) -> None:
    first = node.json("add", "offline first")["id"]
    second = node.json("add", "offline second", "--link", first)["id"]
    commands = [("get", second), ("query", "offline", "--json"), ("graph", first)]
    offline = [node.run(*c).stdout for c in commands]
    node.start()
    assert [node.run(*c).stdout for c in commands] == offline
    # Errors too: same one line, same exit code.
    missing = node.run("get", "0123456789abcdef", ok=False)
    assert missing.returncode == 9 and missing.stderr.startswith("dmgn: ")


def test_start_recovers_after_sigkill_and_the_daemon_guards_its_data_dir(node: Node) -> None:
    pid = node.start()
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid)
    assert node.pid_file.exists() and node.socket.exists()  # what a crash leaves behind
    again = node.start()  # sees the free lock, removes the stale PID file and socket
    assert node.pid_file.read_text().strip() == str(again)

    second = node.run("start", ok=False)
    assert second.returncode == 11 and "already running" in second.stderr
    replace = node.run("init", "--force", ok=False)
    assert replace.returncode == 11 and "stop it with `dmgn stop`" in replace.stderr
    direct = subprocess.run(
        [sys.executable, "-m", "dmgn.app.node"],
        env=node.env,
        capture_output=True,
        text=True,
        timeout=scaled(30),
    )
    assert direct.returncode == 11 and f"pid {again}" in direct.stderr
    assert node.json("status")["mode"] == "daemon"  # nothing disturbed it


def test_stop_when_not_running_says_so(node: Node) -> None:
    done = node.run("stop")
    assert "not running" in done.stdout


def test_node_refuses_key_material_of_another_identity(node: Node) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, os.urandom(32))
    os.close(write_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dmgn.app.node", "--key-fd", str(read_end)],
            env=node.env,
            capture_output=True,
            text=True,
            timeout=scaled(30),
            pass_fds=(read_end,),
        )
    finally:
        os.close(read_end)
    assert done.returncode != 0 and "not the identity" in done.stderr
    assert not node.pid_file.exists()


def test_foreground_daemon_stops_cleanly_on_sigint(node: Node) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "dmgn.app.cli", "start", "--foreground"],
        env=node.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    node.pids.add(process.pid)  # exec keeps the pid: the CLI becomes dmgn-node
    try:
        deadline = time.monotonic() + scaled(90)  # loading the model on a busy machine is slow
        while not (node.socket.exists() and node.pid_file.exists()):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert node.pid_file.read_text().strip() == str(process.pid)
        assert node.json("add", "via a foreground daemon")["id"]
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert "stopped cleanly" in stderr
    assert not node.pid_file.exists() and not node.socket.exists()
