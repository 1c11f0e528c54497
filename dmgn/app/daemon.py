"""Who owns a data dir, and starting/stopping `dmgn-node`: the process side of the daemon.

Ownership rule: whoever holds an exclusive ``flock`` on ``DataDir.lock_file`` owns the data dir.
``dmgn-node`` holds it for its whole life; an offline CLI command holds it while it works. The
kernel drops a flock when its holder dies, however it dies, so the lock - not the PID file, not
the socket file - is the truth about whether a daemon runs. The PID file and socket are then
just addresses: if we can take the lock, any left over are stale (a SIGKILLed daemon) and are
removed.

The unlocked key reaches the daemon through an inherited pipe (``--key-fd``): never argv (world
readable in /proc) nor the environment (readable by the same user's processes, inherited by
children, often logged). For the same reason the daemon is spawned without ``DMGN_PASSPHRASE``
in its environment: it does not need it, and ``/proc/PID/environ`` would show it for its life.

Whom the key goes to: ``python -m`` puts the working directory first on ``sys.path``, so a
``dmgn`` package planted in the folder where someone types ``dmgn start`` (a downloaded repo, a
clone of dmgn itself) would be the code that reads the seed. The daemon is therefore started
with ``-P`` (nothing prepended to ``sys.path``) and with the data dir - 0700, ours - as its
working directory, so relative ``PYTHONPATH`` entries cannot point into the user's folder
either. It imports the ``dmgn`` that is installed for this interpreter, the same one the
``dmgn`` console script runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmgn.errors import DaemonOwnsDataDir, DaemonUnavailable, InvalidInput, error_for_exit_code
from dmgn.paths import DataDir, write_private

#: Bytes of key material handed to dmgn-node over ``--key-fd``: the 32-byte identity seed.
KEY_BYTES = 32
#: How long `dmgn start` waits for a new daemon without a sign of progress. A daemon replaying a
#: large write-ahead log or re-indexing a store may take minutes to answer; while it says it is
#: starting (:func:`write_start_status`, every :data:`START_BEAT` seconds) `dmgn start` waits.
START_TIMEOUT = 30.0
#: How often a starting daemon rewrites its start status file.
START_BEAT = 0.5
#: After this long, `dmgn start` tells the person what the daemon is doing.
SLOW_START_NOTICE = 3.0
#: How long `dmgn stop` waits for the daemon to finish flushing and exit.
STOP_TIMEOUT = 15.0
_POLL = 0.05


# -- the data dir lock ---------------------------------------------------------------------------


def try_lock(data_dir: DataDir) -> int | None:
    """Take the data dir lock without waiting: the open fd (keep it to hold the lock), or None."""
    data_dir.ensure()
    fd = os.open(data_dir.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def release(fd: int) -> None:
    os.close(fd)  # closing the only descriptor drops the flock


def lock_is_free(data_dir: DataDir) -> bool:
    fd = try_lock(data_dir)
    if fd is None:
        return False
    release(fd)
    return True


@contextlib.contextmanager
def offline_access(data_dir: DataDir, *, before: str | None = None) -> Iterator[None]:
    """Hold the data dir while a command works on it without a daemon.

    Raises :class:`DaemonOwnsDataDir` if a daemon (or another command) holds it; with
    ``before`` ("replacing the identity"), for work no daemon may do, the message says to stop
    the daemon first.
    """
    fd = try_lock(data_dir)
    if fd is None:
        if before is None:
            raise owner_error(data_dir)
        pid = read_pid(data_dir)
        raise DaemonOwnsDataDir(
            f"dmgn-node{f' (pid {pid})' if pid else ''} is running for {data_dir.root}; stop "
            f"it with `dmgn stop` before {before}"
        )
    try:
        clean_stale(data_dir)
        yield
    finally:
        release(fd)


# -- the PID file and the process behind it ------------------------------------------------------


def read_pid(data_dir: DataDir) -> int | None:
    try:
        text = data_dir.pid_file.read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def write_pid_file(data_dir: DataDir) -> None:
    write_private(data_dir.pid_file, f"{os.getpid()}\n".encode())


def remove_pid_file(data_dir: DataDir) -> None:
    """Remove the PID file if it is ours (a newer daemon's must survive)."""
    if read_pid(data_dir) == os.getpid():
        data_dir.pid_file.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_dmgn_node(pid: int) -> bool:
    """Whether ``pid`` is a dmgn-node process - checked before we ever signal a PID file's pid,
    because after a crash and a reboot that number may belong to anything."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(arg == b"dmgn.app.node" or os.path.basename(arg) == b"dmgn-node" for arg in argv[:4])


def clean_stale(data_dir: DataDir) -> list[str]:
    """Remove a dead daemon's PID file and socket. Only call while holding the lock."""
    removed = []
    for path in (data_dir.pid_file, data_dir.control_socket, start_status_file(data_dir)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(str(path))
    return removed


def owner_error(data_dir: DataDir) -> DaemonOwnsDataDir:
    """The sentence for "someone else holds this data dir and we cannot go through them"."""
    pid = read_pid(data_dir)
    if pid is not None and pid_alive(pid) and is_dmgn_node(pid):
        return DaemonOwnsDataDir(
            f"the daemon (pid {pid}) owns the data dir {data_dir.root} but is not answering on "
            f"{data_dir.control_socket}; see {data_dir.log_file}, then stop it with `dmgn stop` "
            "(or `dmgn stop --force`)"
        )
    return DaemonOwnsDataDir(
        f"another dmgn process holds the data dir {data_dir.root} (lock {data_dir.lock_file}); "
        "wait for it to finish and try again"
    )


# -- start ---------------------------------------------------------------------------------------


#: Environment variables that carry secrets for the CLI and must not reach the daemon.
SECRET_ENVIRONMENT = ("DMGN_PASSPHRASE", "DMGN_NEW_PASSPHRASE")


def node_environment() -> dict[str, str]:
    """The daemon's environment: ours without the passphrase variables."""
    return {k: v for k, v in os.environ.items() if k not in SECRET_ENVIRONMENT}


def node_command(data_dir: DataDir, key_fd: int, *, foreground: bool = False) -> list[str]:
    """The daemon's argv; run it with ``cwd=data_dir.root`` (see the module docstring)."""
    argv = [
        sys.executable,
        "-P",  # the working directory is not put on sys.path (Python 3.11+)
        "-m",
        "dmgn.app.node",
        "--data-dir",
        str(data_dir.root),
        "--key-fd",
        str(key_fd),
    ]
    return [*argv, "--foreground"] if foreground else argv


def startup_output(data_dir: DataDir) -> str:
    """Where a background daemon's stdout/stderr go: its words if it dies before logging."""
    return str(data_dir.log_file.with_suffix(".out"))


def spawn_node(data_dir: DataDir, seed: bytes) -> subprocess.Popen[bytes]:
    """Start dmgn-node in the background (own session, no terminal) and hand it the key."""
    if len(seed) != KEY_BYTES:
        raise InvalidInput("internal: key material must be 32 bytes")
    data_dir.log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    read_end, write_end = os.pipe()
    try:
        with open(startup_output(data_dir), "wb") as output:
            process = subprocess.Popen(
                node_command(data_dir, read_end),
                pass_fds=(read_end,),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                start_new_session=True,
                close_fds=True,
                cwd=data_dir.root,
                env=node_environment(),
            )
        os.close(read_end)
        read_end = -1
        # 32 bytes fit in any pipe buffer, so this cannot block on a child that never reads.
        os.write(write_end, seed)
    finally:
        os.close(write_end)
        if read_end >= 0:
            os.close(read_end)
    return process


def exec_node_foreground(data_dir: DataDir, seed: bytes) -> None:
    """Replace this process with dmgn-node in the foreground, handing it the key by pipe."""
    read_end, write_end = os.pipe()
    os.write(write_end, seed)
    os.close(write_end)
    os.set_inheritable(read_end, True)
    sys.stdout.flush()
    sys.stderr.flush()
    argv = node_command(data_dir, read_end, foreground=True)
    os.chdir(data_dir.root)
    os.execve(argv[0], argv, node_environment())


# -- start progress: what a starting daemon is doing ---------------------------------------------


def start_status_file(data_dir: DataDir) -> Path:
    return data_dir.root / "dmgn-node.starting"


def write_start_status(data_dir: DataDir, phase: str) -> None:
    """Say "still starting, now doing ``phase``" (no fsync: a lost beat is only a late one)."""
    path = start_status_file(data_dir)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({"pid": os.getpid(), "phase": phase, "at": time.time()}))
    os.replace(tmp, path)


def read_start_status(data_dir: DataDir, pid: int) -> tuple[str, float] | None:
    """``(phase, when)`` from daemon ``pid``'s start status file, or None."""
    try:
        document = json.loads(start_status_file(data_dir).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("pid") != pid:
        return None
    phase, at = document.get("phase"), document.get("at")
    if not isinstance(phase, str) or not isinstance(at, int | float):
        return None
    return phase, float(at)


def clear_start_status(data_dir: DataDir) -> None:
    """Remove our start status file (not a newer daemon's)."""
    path = start_status_file(data_dir)
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()


def wait_until_ready(
    data_dir: DataDir,
    process: subprocess.Popen[bytes],
    timeout: float = START_TIMEOUT,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Wait for the new daemon's control socket to answer a ping; its facts, or a clear error.

    Gives up only after ``timeout`` seconds without a sign of progress: a daemon that keeps
    saying it is starting (its start status file) is waited for, however long that takes.
    ``on_progress`` hears each new phase once the start has taken :data:`SLOW_START_NOTICE`.
    """
    from dmgn.app.control_client import ping

    began = last_sign = time.monotonic()
    phase, told, beat = "starting Python", None, 0.0
    while True:
        code = process.poll()
        if code is not None:
            words = _last_words(data_dir)
            # dmgn-node's own one-line error (a taken port, a bad config...) is the user's
            # error: same sentence, same exit code as if this command had hit it.
            prefix = ": dmgn-node: "
            typed = error_for_exit_code(code, words[len(prefix) :])
            if words.startswith(prefix) and typed is not None and code != 1:
                raise typed
            where = "" if str(data_dir.log_file) in words else f"; see {data_dir.log_file}"
            raise DaemonUnavailable(
                f"dmgn-node exited during start (exit code {code}){words}{where}"
            )
        try:
            facts = ping(data_dir, timeout=1.0)
        except DaemonUnavailable:
            facts = None
        if facts is not None and facts.get("pid") == process.pid:
            return facts
        now = time.monotonic()
        status = read_start_status(data_dir, process.pid)
        if status is not None and status[1] != beat:
            (phase, beat), last_sign = status, now
        if on_progress is not None and phase != told and now - began > SLOW_START_NOTICE:
            on_progress(phase)
            told = phase
        if now - last_sign > timeout:
            raise DaemonUnavailable(
                f"dmgn-node (pid {process.pid}) gave no sign of progress for {timeout:g}s "
                f"(last: {phase}) and its control socket does not answer; see "
                f"{data_dir.log_file}, then wait and try `dmgn status`, or stop it with "
                "`dmgn stop`"
            )
        time.sleep(_POLL)


def _last_words(data_dir: DataDir) -> str:
    try:
        text = Path(startup_output(data_dir)).read_text(errors="replace")
    except OSError:
        return ""
    lines = text.strip().splitlines()
    return f": {lines[-1]}" if lines else ""


# -- stop ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StopOutcome:
    was_running: bool
    pid: int | None
    how: str  # "not running" | "control socket" | "SIGTERM" | "SIGKILL"
    stale_removed: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "was_running": self.was_running,
            "pid": self.pid,
            "how": self.how,
            "stale_removed": self.stale_removed,
        }


def stop_node(data_dir: DataDir, timeout: float = STOP_TIMEOUT, force: bool = False) -> StopOutcome:
    """Ask the daemon to shut down cleanly and wait until it has released the data dir."""
    from dmgn.app.control_client import shutdown

    if not data_dir.root.is_dir():
        # Nothing can run for a data dir that does not exist; taking its lock would create it.
        return StopOutcome(False, None, "not running", [])
    fd = try_lock(data_dir)
    if fd is not None:
        try:
            return StopOutcome(False, None, "not running", clean_stale(data_dir))
        finally:
            release(fd)
    pid = read_pid(data_dir)
    how = "control socket"
    try:
        answer = shutdown(data_dir, timeout=5.0)
        pid = answer.get("pid", pid)
    except DaemonUnavailable:
        if pid is None or not is_dmgn_node(pid):
            raise owner_error(data_dir) from None
        how = "SIGTERM"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    fd = _wait_for_lock(data_dir, timeout)
    if fd is None:
        if not force:
            raise DaemonUnavailable(
                f"dmgn-node (pid {pid}) did not stop within {timeout:g}s; it may still be "
                f"flushing (see {data_dir.log_file}); wait and run `dmgn stop` again, or "
                "`dmgn stop --force` to kill it (the next `dmgn start` cleans up after it)"
            )
        if pid is None or not is_dmgn_node(pid):
            raise owner_error(data_dir)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        how = "SIGKILL"
        fd = _wait_for_lock(data_dir, 5.0)
        if fd is None:
            raise owner_error(data_dir)
    try:
        return StopOutcome(True, pid, how, clean_stale(data_dir))
    finally:
        release(fd)


def _wait_for_lock(data_dir: DataDir, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while True:
        fd = try_lock(data_dir)
        if fd is not None or time.monotonic() > deadline:
            return fd
        time.sleep(_POLL)


def running_daemon(data_dir: DataDir) -> dict[str, Any] | None:
    """Facts of the daemon answering for ``data_dir``, or None (stale files are cleaned up).

    Raises :class:`DaemonOwnsDataDir` if the data dir is held by something that does not answer.
    """
    from dmgn.app.control_client import ping

    fd = try_lock(data_dir)
    if fd is not None:
        try:
            clean_stale(data_dir)
            return None
        finally:
            release(fd)
    try:
        return ping(data_dir, timeout=2.0)
    except DaemonUnavailable:
        raise owner_error(data_dir) from None
