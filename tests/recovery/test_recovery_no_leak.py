"""After a split, no share's words are anywhere but where the user sent them.

A real daemon runs for the data dir while `dmgn export --shares` splits the identity (to files
and, forced, to a pipe the test reads) and while another data dir imports from the files. Then
every file of both data dirs (logs included), the daemon's startup output, and the daemon's
/proc environ and cmdline are searched for any three consecutive words of any share.
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

from dmgn.app.daemon import is_dmgn_node, pid_alive, startup_output
from dmgn.paths import DataDir
from tests._deadlines import scaled
from tests._processes import exited

pytestmark = pytest.mark.slow

PASSPHRASE = "no-leak-test-passphrase"
WINDOW = 3


def dmgn(data_dir: Path, *args: str) -> Any:
    env = {**os.environ, "DMGN_DATA_DIR": str(data_dir), "DMGN_PASSPHRASE": PASSPHRASE}
    env.pop("DMGN_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-m", "dmgn.app.cli", *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=scaled(90),
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def sequences(mnemonic: str) -> set[bytes]:
    words = mnemonic.split()
    return {" ".join(words[i : i + WINDOW]).encode() for i in range(len(words) - WINDOW + 1)}


def leaks_in(blob: bytes, secrets: set[bytes]) -> list[bytes]:
    return [s for s in secrets if s in blob]


def files_under(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_socket():
            yield path


@pytest.fixture
def workspace() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="dmgn-"))  # short: socket paths are limited to 107 bytes
    pids: list[int] = []
    try:
        yield root
    finally:
        pid_file = root / "data" / "dmgn-node.pid"
        if pid_file.exists():
            pids.append(int(pid_file.read_text()))
        for pid in pids:
            if pid_alive(pid) and is_dmgn_node(pid):
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while not exited(pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
        shutil.rmtree(root, ignore_errors=True)


def test_no_share_word_sequence_in_data_dirs_logs_or_daemon_environment(workspace: Path) -> None:
    data = workspace / "data"
    dmgn(data, "init")
    config = data / "config.json"
    document = json.loads(config.read_text())
    document.update(listen_addr="ws://127.0.0.1:0", mdns=False)  # loopback only, free port
    config.write_text(json.dumps(document))
    pid = int(dmgn(data, "start")["pid"])
    dmgn(data, "add", "written while the daemon runs")
    names_before = {p.relative_to(data) for p in files_under(data)}

    shares_dir = workspace / "handed-out"
    exported = dmgn(data, "export", "--shares", "3-of-5", "-o", str(shares_dir))
    printed = dmgn(data, "export", "--shares", "2-of-3", "--force")
    mnemonics = [Path(f["file"]).read_text().splitlines()[-1] for f in exported["files"]]
    mnemonics += [share["mnemonic"] for share in printed["shares"]]
    assert len(mnemonics) == 8 and all(len(m.split()) == 33 for m in mnemonics)
    secrets = set().union(*(sequences(m) for m in mnemonics))

    restored = workspace / "restored"
    files = [f["file"] for f in exported["files"][:3]]
    assert dmgn(restored, "import", "--shares", *files)["identity_id"] == exported["identity_id"]
    dmgn(data, "status")  # the daemon is alive and answering after all this

    # The search finds what is there: the files the user asked for hold their share.
    for path, mnemonic in zip(sorted(shares_dir.iterdir()), mnemonics, strict=False):
        assert leaks_in(path.read_bytes(), sequences(mnemonic))

    places = [*files_under(data), *files_under(restored), Path(startup_output(DataDir(data)))]
    assert DataDir(data).log_file in places
    for path in places:
        assert leaks_in(path.read_bytes(), secrets) == [], f"share words in {path}"
    for part in ("environ", "cmdline"):
        blob = Path(f"/proc/{pid}/{part}").read_bytes()
        assert blob, part
        assert leaks_in(blob, secrets) == [], f"share words in the daemon's {part}"
    # The export wrote nothing into the data dir (no temp file, no cache of the shares).
    assert {p.relative_to(data) for p in files_under(data)} - names_before == set()
    dmgn(data, "stop")
