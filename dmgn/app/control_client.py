"""Client side of the control socket: how `dmgn` talks to a running `dmgn-node`.

Blocking sockets on purpose: a CLI command makes one request and exits, and must not pay for an
event loop it does not need. Errors the daemon reports come back as the same typed
:class:`~dmgn.errors.DmgnError` the offline path raises, so the CLI prints the same line either
way; trouble reaching the daemon is :class:`~dmgn.errors.DaemonUnavailable`.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dmgn.control_protocol import (
    OP_PING,
    OP_SHUTDOWN,
    ControlProtocolError,
    FrameDecoder,
    decode_response,
    encode_request,
)
from dmgn.errors import DaemonOwnsDataDir, DaemonUnavailable
from dmgn.paths import DataDir

if TYPE_CHECKING:
    from dmgn import api

#: Client-side wait for an answer: the daemon's own per-request deadline (60 s, see
#: actors/control.py) plus slack, so the daemon's "timeout" error arrives before ours.
REQUEST_TIMEOUT = 65.0
#: How long a command waits for a data dir held by someone who is not (yet) answering: a daemon
#: that is still starting (loading the embedding model and index takes a few seconds), or
#: another offline command (they take a second or two).
OWNER_WAIT = 10.0
#: How long an offline command waits for its turn on a data dir other commands hold: each
#: holds it for a second or two (a few on a busy machine), so this covers a handful queued.
OFFLINE_TURN_WAIT = 30.0
_POLL = 0.05
_ids = itertools.count(1)


class NotListening(DaemonUnavailable):
    """Nothing accepted the connection; the request was certainly not sent."""


def call(
    data_dir: DataDir,
    body: api.AnyRequest | dict[str, Any] | str,
    *,
    timeout: float = REQUEST_TIMEOUT,
) -> dict[str, Any]:
    """Send one request (an API request, one in its wire form, or a control op name) and return
    the response. This module imports neither pydantic nor the daemon-spawning code at load:
    `dmgn status` through the daemon (dmgn.app.daemon_cli) needs only this function.

    Raises the daemon's typed error, :class:`NotListening` if nobody accepted the connection, or
    :class:`DaemonUnavailable` if the daemon failed mid-request.
    """
    path = data_dir.control_socket
    request_id = next(_ids)
    frame = encode_request(request_id, body)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(min(timeout, 5.0))
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as error:
            raise NotListening(f"no dmgn-node is listening on {path} ({error.strerror})") from None
        except PermissionError:
            raise DaemonUnavailable(
                f"permission denied connecting to {path}: the daemon belongs to another user"
            ) from None
        except OSError as error:
            raise NotListening(f"cannot connect to {path}: {error}") from None
        sock.settimeout(timeout)
        try:
            sock.sendall(frame)
            payload = _receive_frame(sock)
        except TimeoutError:
            raise DaemonUnavailable(
                f"dmgn-node did not answer within {timeout:g}s; see {data_dir.log_file}"
            ) from None
        except (OSError, ControlProtocolError) as error:
            raise DaemonUnavailable(f"the connection to dmgn-node failed: {error}") from None
    answered_id, response = decode_response(payload)
    if isinstance(response, Exception):
        raise response
    if answered_id != request_id:
        raise DaemonUnavailable(f"dmgn-node answered request {answered_id}, not {request_id}")
    return response


def _receive_frame(sock: socket.socket) -> bytes:
    decoder = FrameDecoder()
    while True:
        data = sock.recv(64 * 1024)
        if not data:
            raise ControlProtocolError("dmgn-node closed the connection without answering")
        frames = decoder.receive_data(data)
        if frames:
            return frames[0]


def ping(data_dir: DataDir, *, timeout: float = 2.0) -> dict[str, Any]:
    """The daemon's facts (pid, version, listen addresses...); raises if it does not answer."""
    return call(data_dir, OP_PING, timeout=timeout)


def shutdown(data_dir: DataDir, *, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the daemon to shut down; returns once it has acknowledged (not once it has exited)."""
    return call(data_dir, OP_SHUTDOWN, timeout=timeout)


def daemon_request(
    data_dir: DataDir, request: api.AnyRequest, *, owner_wait: float = OWNER_WAIT
) -> api.Response | None:
    """Send ``request`` to the daemon for ``data_dir``; ``None`` when no daemon is running.

    "Running" is decided by the data dir lock, not by files lying around: if the lock is free,
    any PID file or socket is a crashed daemon's and is removed, and the caller works offline.
    If the lock is held, we go through the socket, waiting up to ``owner_wait`` for a daemon
    that is still starting or for another command to finish; after that,
    :class:`~dmgn.errors.DaemonOwnsDataDir` says who holds the data dir.
    """
    from dmgn.app.daemon import clean_stale, owner_error, release, try_lock

    if not data_dir.root.is_dir():
        return None
    deadline = time.monotonic() + owner_wait
    while True:
        fd = try_lock(data_dir)
        if fd is not None:
            try:
                clean_stale(data_dir)
            finally:
                release(fd)
            return None
        with contextlib.suppress(NotListening):
            # The daemon's deadline for this request plus slack, so its answer arrives first.
            timeout = request.deadline + 5.0 if request.deadline else REQUEST_TIMEOUT
            return call(data_dir, request, timeout=timeout)
        if time.monotonic() > deadline:
            raise owner_error(data_dir)
        time.sleep(_POLL)


def run_offline_or_via_daemon(
    data_dir: DataDir,
    request: api.AnyRequest,
    work: Callable[[], api.Response],
    *,
    owner_wait: float = OFFLINE_TURN_WAIT,
) -> api.Response:
    """Run ``work`` (the request, in-process) holding the data dir lock - after
    :func:`daemon_request` said no daemon runs.

    Between that answer and taking the lock someone else may have taken it: another offline
    command (two scripts adding at once), or a daemon that just started. Then we wait up to
    ``owner_wait`` for them: a daemon that starts answering gets the request, a command that
    finishes frees the lock and we take our turn. Only a holder that neither answers nor lets
    go in that time is an error (:class:`~dmgn.errors.DaemonOwnsDataDir`).
    """
    from dmgn.app.daemon import offline_access

    deadline = time.monotonic() + owner_wait
    while True:
        try:
            with offline_access(data_dir):
                return work()
        except DaemonOwnsDataDir:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise
            response = daemon_request(data_dir, request, owner_wait=remaining)
            if response is not None:
                return response
