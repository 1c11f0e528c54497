"""A new user's first run on a busy machine, inside a network namespace of its own.

Run by ``test_daemon_port_fallback.py`` under ``unshare -rn``: nothing here can reach the real
LAN or collide with the machine's ports, although the nodes run the *default* config (every
interface, port 4001, mDNS on). In the namespace, another program holds 127.0.0.1:4001 and
another person's dmgn node is already running; then the README's first commands run against
a fresh data dir. Prints one JSON document with what each step printed; asserts nothing (the
test does), so a failure shows the whole story.
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def dmgn(data_dir: Path, *args: str) -> dict[str, Any]:
    env = {
        **os.environ,
        "DMGN_DATA_DIR": str(data_dir),
        "DMGN_PASSPHRASE": "first-run-passphrase",
        "DMGN_EMBEDDER": "hashing",
        "COLUMNS": "200",
    }
    env.pop("DMGN_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-m", "dmgn.app.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    return {"rc": done.returncode, "out": done.stdout, "err": done.stderr}


def kill_daemon(data_dir: Path) -> None:
    pid_file = data_dir / "dmgn-node.pid"
    if pid_file.exists():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="dmgn-ns-"))
    other, mine, strict = root / "other", root / "mine", root / "strict"
    report: dict[str, Any] = {}
    holder = socket.socket()
    holder.bind(("127.0.0.1", 4001))  # "another program" on the README's port
    holder.listen()
    try:
        # Another person's node, default config, already running.
        report["other_init"] = dmgn(other, "init")
        report["other_start"] = dmgn(other, "start")
        # The README's first line, on a fresh data dir.
        report["init"] = dmgn(mine, "init")
        report["start"] = dmgn(mine, "start")
        report["add"] = dmgn(mine, "add", "the first memory of a new user", "--json")
        report["query"] = dmgn(mine, "query", "first memory", "--json")
        report["status"] = dmgn(mine, "status", "--json")
        config = mine / "config.json"
        report["config"] = json.loads(config.read_text()) if config.exists() else None
        # A listen address the user wrote down stays strict.
        report["strict_init"] = dmgn(strict, "init")
        document = json.loads((strict / "config.json").read_text())
        document["listen_addr"] = "ws://127.0.0.1:4001"
        (strict / "config.json").write_text(json.dumps(document))
        report["strict_start"] = dmgn(strict, "start")
        # The README's second line (a part of it: the suite would run this file again) with
        # the port still taken and both daemons running. In one process (-n 0): four xdist
        # workers for these 20 quick tests cost 8 s instead of 2, and would meet the ports and
        # daemons just the same.
        tests = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-n",
                "0",
                "-p",
                "no:cacheprovider",
                "tests/daemon/test_daemon_lock.py",
                "tests/foundation/test_config.py",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        report["pytest"] = {"rc": tests.returncode, "out": tests.stdout[-2000:]}
        report["stop"] = dmgn(mine, "stop")
        report["other_stop"] = dmgn(other, "stop")
    finally:
        holder.close()
        for data_dir in (mine, other, strict):
            kill_daemon(data_dir)
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
