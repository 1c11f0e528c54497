"""Who owns a data dir: the lock decides, PID files and sockets are only addresses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dmgn import api
from dmgn.app import daemon
from dmgn.app.control_client import daemon_request
from dmgn.errors import DaemonOwnsDataDir
from dmgn.paths import DataDir


@pytest.fixture
def data_dir(tmp_path: Path) -> DataDir:
    directory = DataDir(tmp_path / "data")
    directory.ensure()
    return directory


def test_free_lock_means_no_daemon_and_stale_files_are_removed(data_dir: DataDir) -> None:
    data_dir.pid_file.write_text("999999\n")
    data_dir.control_socket.write_text("")  # what a SIGKILLed daemon leaves
    assert daemon_request(data_dir, api.Status()) is None
    assert not data_dir.pid_file.exists() and not data_dir.control_socket.exists()


def test_held_lock_without_an_answering_socket_is_reported(data_dir: DataDir) -> None:
    holder = daemon.try_lock(data_dir)
    assert holder is not None
    try:
        with pytest.raises(DaemonOwnsDataDir, match="another dmgn process holds"):
            daemon_request(data_dir, api.Status(), owner_wait=0.1)
        with pytest.raises(DaemonOwnsDataDir), daemon.offline_access(data_dir):
            pass
    finally:
        daemon.release(holder)


def test_unanswering_daemon_is_named_with_its_pid(
    data_dir: DataDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = daemon.try_lock(data_dir)
    assert holder is not None
    data_dir.pid_file.write_text(f"{os.getpid()}\n")
    monkeypatch.setattr(daemon, "is_dmgn_node", lambda pid: pid == os.getpid())
    try:
        with pytest.raises(
            DaemonOwnsDataDir,
            match=rf"the daemon \(pid {os.getpid()}\) owns the data dir .* not "
            "answering",
        ):
            daemon_request(data_dir, api.Status(), owner_wait=0.1)
    finally:
        daemon.release(holder)


def test_stop_never_signals_a_process_that_is_not_dmgn_node(data_dir: DataDir) -> None:
    holder = daemon.try_lock(data_dir)
    assert holder is not None
    data_dir.pid_file.write_text(f"{os.getpid()}\n")  # this pytest process: must survive
    try:
        assert not daemon.is_dmgn_node(os.getpid())
        with pytest.raises(DaemonOwnsDataDir):
            daemon.stop_node(data_dir, timeout=0.1)
    finally:
        daemon.release(holder)


def test_offline_access_holds_the_lock_while_working(data_dir: DataDir) -> None:
    with daemon.offline_access(data_dir):
        assert not daemon.lock_is_free(data_dir)
    assert daemon.lock_is_free(data_dir)


def test_replacing_the_identity_under_a_daemon_says_to_stop_it(data_dir: DataDir) -> None:
    holder = daemon.try_lock(data_dir)
    assert holder is not None
    data_dir.pid_file.write_text("4242\n")
    try:
        with (
            pytest.raises(DaemonOwnsDataDir, match=r"\(pid 4242\).*`dmgn stop` before"),
            daemon.offline_access(data_dir, before="replacing the identity"),
        ):
            pass
    finally:
        daemon.release(holder)
