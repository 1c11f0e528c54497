"""Whether a daemon a test started has exited, zombies included.

A daemon `dmgn start` launched outlives the CLI that started it, so its parent becomes the
machine's init, which reaps it when it gets round to it: this sandbox's init takes ~2 s, and
until then ``kill(pid, 0)`` (``dmgn.app.daemon.pid_alive``) still finds the pid. Tests that wait
for a daemon to be gone (after ``dmgn stop``, after SIGKILL, in every teardown) waited that
long each time. A zombie has exited: its descriptors, data dir lock and sockets are released.
"""

from __future__ import annotations

import contextlib
import os

from dmgn.app.daemon import pid_alive

__all__ = ["exited"]


def exited(pid: int) -> bool:
    """True once ``pid`` has exited: it is gone, or a zombie not yet reaped."""
    with contextlib.suppress(ChildProcessError):  # reap it if it is our child
        os.waitpid(pid, os.WNOHANG)
    if not pid_alive(pid):
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # "pid (comm) state ...": comm may hold spaces and parentheses, so split at the last.
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return not pid_alive(pid)
    return state in (b"Z", b"X")
