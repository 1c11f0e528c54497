"""Who receives the unlocked key: `dmgn start` from a hostile or awkward working directory.

Real processes: the installed `dmgn` console script starts a real `dmgn-node`; every daemon is
killed in teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dmgn.app.daemon import is_dmgn_node, pid_alive
from tests._processes import exited

pytestmark = pytest.mark.slow

PASSPHRASE = "launch-test-passphrase"
DMGN = Path(sys.executable).with_name("dmgn")

#: A `dmgn` package as an attacker would plant it: its node entry point steals the seed.
PLANTED_NODE = """
import os, sys
fd = int(sys.argv[sys.argv.index("--key-fd") + 1])
with open(os.environ["STOLEN_TO"], "wb") as out:
    out.write(os.read(fd, 64))
"""


class Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.data = root / "data"
        self.cwd = root / "cwd"
        self.cwd.mkdir()
        self.stolen = root / "stolen"
        self.env = {
            **os.environ,
            "DMGN_DATA_DIR": str(self.data),
            "DMGN_PASSPHRASE": PASSPHRASE,
            "DMGN_EMBEDDER": "hashing",
            "STOLEN_TO": str(self.stolen),
        }
        self.env.pop("DMGN_DEBUG", None)
        self.env.pop("PYTHONPATH", None)
        self.pids: set[int] = set()

    def dmgn(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(DMGN), *args],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self) -> dict[str, Any]:
        done = self.dmgn("start", "--json")
        assert done.returncode == 0, done.stderr
        facts: dict[str, Any] = json.loads(done.stdout)
        self.pids.add(int(facts["pid"]))
        return facts

    def kill_all(self) -> None:
        pid_file = self.data / "dmgn-node.pid"
        if pid_file.exists():
            with contextlib.suppress(ValueError):
                self.pids.add(int(pid_file.read_text()))
        for pid in self.pids:
            if pid_alive(pid) and is_dmgn_node(pid):
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while not exited(pid) and time.monotonic() < deadline:
                    time.sleep(0.02)


@pytest.fixture
def workspace() -> Iterator[Workspace]:
    root = Path(tempfile.mkdtemp(prefix="dmgn-"))  # short: socket paths are limited to 107 bytes
    space = Workspace(root)
    done = space.dmgn("init")
    assert done.returncode == 0, done.stderr
    config = space.data / "config.json"
    document = json.loads(config.read_text())
    document.update(listen_addr="ws://127.0.0.1:0", mdns=False)
    config.write_text(json.dumps(document))
    try:
        yield space
    finally:
        space.kill_all()
        shutil.rmtree(root, ignore_errors=True)


def test_a_dmgn_package_planted_in_the_working_directory_never_gets_the_key(
    workspace: Workspace,
) -> None:
    planted = workspace.cwd / "dmgn" / "app"
    planted.mkdir(parents=True)
    (workspace.cwd / "dmgn" / "__init__.py").write_text("__version__ = '0.1.0'\n")
    (planted / "__init__.py").write_text("")
    (planted / "node.py").write_text(PLANTED_NODE)
    done = workspace.dmgn("start", "--json")
    assert not workspace.stolen.exists(), "the planted package read the seed"
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    workspace.pids.add(int(facts["pid"]))
    cmdline = Path(f"/proc/{facts['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"-P" in cmdline  # and the daemon is the installed one: it answers
    status = workspace.dmgn("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["mode"] == "daemon"


def test_start_works_from_the_folder_that_holds_a_clone_of_dmgn(workspace: Workspace) -> None:
    clone = workspace.cwd / "dmgn"  # `git clone .../dmgn` makes this: a dir without __init__
    clone.mkdir()
    (clone / "pyproject.toml").write_text("[project]\nname = 'dmgn'\n")
    (clone / "README.md").write_text("dmgn\n")
    facts = workspace.start()
    assert pid_alive(int(facts["pid"]))
    assert not (workspace.data / "dmgn-node.starting").exists()  # gone once it answers


def test_the_daemon_environment_does_not_hold_the_passphrase(workspace: Workspace) -> None:
    facts = workspace.start()
    environ = Path(f"/proc/{facts['pid']}/environ").read_bytes()
    assert b"DMGN_DATA_DIR=" in environ  # the rest of the environment is passed on
    assert b"DMGN_PASSPHRASE" not in environ
    assert PASSPHRASE.encode() not in environ


def test_an_error_while_starting_is_one_line_with_its_own_exit_code(workspace: Workspace) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        config = workspace.data / "config.json"
        document = json.loads(config.read_text())
        document["listen_addr"] = f"ws://127.0.0.1:{taken.getsockname()[1]}"
        config.write_text(json.dumps(document))
        done = workspace.dmgn("start")
    finally:
        taken.close()
    assert done.returncode == 7, done.stderr  # ConfigError, not "failed: ExceptionGroup"
    assert done.stderr.startswith("dmgn: cannot listen on ")
    assert len(done.stderr.strip().splitlines()) == 1
