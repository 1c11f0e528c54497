"""The control actor: the local Unix socket through which `dmgn` drives a running `dmgn-node`.

Who may connect: only processes of the user who runs the node. Three fences, outermost first:
the data dir is 0700, the socket file is 0600 (so the kernel refuses other users before we see
them), and every accepted connection's peer uid is read with ``SO_PEERCRED`` and compared with
ours - the last fence is the one that holds if a directory mode is ever loosened by hand.

What it serves: the frames of :mod:`dmgn.control_protocol`. API requests are forwarded to the
memory service (the same ``Request`` the CLI uses in-process, so output is identical); the daemon
control ops ``daemon.ping`` and ``daemon.shutdown`` are answered here.

Robustness rules: each connection is its own task, at most :data:`MAX_CONNECTIONS` at once
(more are told "busy" and closed, so a flood cannot exhaust file descriptors); each request gets
:data:`REQUEST_DEADLINE`; a malformed payload gets an error reply on the same connection, a broken
frame length closes only that connection. Nothing a client sends can stop the actor.

This actor has no inbox: it is driven by the socket, and talks to the service by address.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from actors._service_requests import ServiceAddress
from actors._unix_socket import (
    MAX_SOCKET_PATH,
    accept_stream,
    listen_private_unix,
    peer_credentials,
    remove_if_ours,
)
from actors.runtime import Err, ask
from dmgn.control_protocol import (
    OP_PING,
    OP_SHUTDOWN,
    BadRequest,
    ControlProtocolError,
    ControlRequest,
    FrameDecoder,
    decode_request,
    encode_error,
    encode_ok,
)
from dmgn.errors import DmgnError

__all__ = [
    "IDLE_TIMEOUT",
    "MAX_CONNECTIONS",
    "REQUEST_DEADLINE",
    "ControlActor",
    "check_peer",
    "peer_credentials",
]

log = logging.getLogger("dmgn.control")


#: Connections served at once. The CLI opens one per command and MCP sessions hold one each, so
#: a person never gets near this; it exists so a runaway script cannot exhaust the daemon's fds.
MAX_CONNECTIONS = 64
#: Per-request deadline. A local query over a large store takes well under a second; a full
#: keyword scan of hundreds of thousands of memories may take tens of seconds. Past this the
#: client gets a "timeout" error instead of waiting forever on a wedged actor.
REQUEST_DEADLINE = 60.0
#: A connection that sends nothing for this long is closed, so idle clients cannot hold slots.
IDLE_TIMEOUT = 120.0
#: A client that does not read its answer for this long is dropped.
SEND_TIMEOUT = 10.0
#: Pending connections the kernel queues while we are busy accepting.
LISTEN_BACKLOG = 128
_RECEIVE_CHUNK = 64 * 1024


def check_peer(peer_uid: int, allowed_uid: int) -> str | None:
    """``None`` if the peer may use the socket, else the reason it may not."""
    if peer_uid == allowed_uid:
        return None
    return (
        f"this dmgn-node belongs to uid {allowed_uid}; connections from uid {peer_uid} are refused"
    )


class ControlActor:
    def __init__(
        self,
        socket_path: Path,
        service: ServiceAddress,
        *,
        describe: Callable[[], dict[str, Any]],
        request_shutdown: Callable[[], None],
        allowed_uid: int | None = None,
        max_connections: int = MAX_CONNECTIONS,
        request_deadline: float = REQUEST_DEADLINE,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
            raise DmgnError(
                f"the control socket path {socket_path} is longer than the "
                f"{MAX_SOCKET_PATH} bytes a Unix socket allows; use a shorter "
                "--data-dir"
            )
        self._path = socket_path
        self._service = service
        self._describe = describe
        self._request_shutdown = request_shutdown
        self._allowed_uid = os.getuid() if allowed_uid is None else allowed_uid
        self._max_connections = max_connections
        self._deadline = request_deadline
        self._idle_timeout = idle_timeout
        self._active = 0

    @property
    def active_connections(self) -> int:
        return self._active

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener, identity = await listen_private_unix(
            self._path, backlog=LISTEN_BACKLOG, what="control socket"
        )
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                log.info("control socket listening on %s", self._path)
                while True:
                    stream = await accept_stream(listener, "control socket")
                    if self._active >= self._max_connections:
                        nursery.start_soon(
                            self._refuse,
                            stream,
                            "busy",
                            f"dmgn-node is serving {self._active} connections "
                            "already; try again shortly",
                        )
                    else:
                        self._active += 1
                        nursery.start_soon(self._serve, stream)
        finally:
            listener.close()
            remove_if_ours(self._path, identity)

    async def _refuse(self, stream: trio.SocketStream, code: str, message: str) -> None:
        with trio.move_on_after(SEND_TIMEOUT):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(encode_error(None, code, message))
        await stream.aclose()

    async def _serve(self, stream: trio.SocketStream) -> None:
        try:
            pid, uid, _ = peer_credentials(stream.socket)
            refusal = check_peer(uid, self._allowed_uid)
            if refusal is not None:
                log.warning("refused control connection from pid %d uid %d", pid, uid)
                await self._refuse(stream, "permission_denied", refusal)
                return
            await self._converse(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away mid-answer; nothing to tell anyone
        finally:
            self._active -= 1
            await stream.aclose()

    async def _converse(self, stream: trio.SocketStream) -> None:
        decoder = FrameDecoder()
        while True:
            with trio.move_on_after(self._idle_timeout) as idle:
                data = await stream.receive_some(_RECEIVE_CHUNK)
            if idle.cancelled_caught or not data:
                return
            try:
                payloads = decoder.receive_data(data)
            except ControlProtocolError as error:
                log.info("closing control connection: %s", error)
                await self._send(stream, encode_error(None, error.code, str(error)))
                return
            for payload in payloads:
                answer, then = await self._answer(payload)
                await self._send(stream, answer)
                if then is not None:
                    then()

    async def _send(self, stream: trio.SocketStream, frame: bytes) -> None:
        with trio.move_on_after(SEND_TIMEOUT) as scope:
            await stream.send_all(frame)
        if scope.cancelled_caught:
            raise trio.BrokenResourceError("client is not reading its answers")

    async def _answer(self, payload: bytes) -> tuple[bytes, Callable[[], None] | None]:
        """The reply frame for one payload, and what to do once it has been sent.

        Never raises for anything a client sent: a request that trips a bug in validation or
        in a handler costs that one request an ``internal`` error reply, not the actor (six
        crashes in a minute would stop the node - issue 12, item 7).
        """
        request_id: int | None = None
        try:
            request = decode_request(payload)
            request_id = request.id
            return await self._dispatch(request)
        except BadRequest as error:
            log.info("bad control request: %s", error)
            return encode_error(error.request_id, error.code, str(error)), None
        except Exception as error:  # a bug reached by client input: log it, answer, go on
            log.exception("control request %s failed inside the daemon", request_id)
            return encode_error(
                request_id,
                "internal",
                f"dmgn-node failed on this request ({type(error).__name__}); it keeps running, "
                "and the details are in its log",
            ), None

    async def _dispatch(self, request: ControlRequest) -> tuple[bytes, Callable[[], None] | None]:
        if request.control == OP_PING:
            return encode_ok(request.id, self._describe()), None
        if request.control == OP_SHUTDOWN:
            log.info("shutdown requested over the control socket")
            # Answer first: once shutdown starts, this task is cancelled with everything else.
            return encode_ok(
                request.id, {"stopping": True, "pid": os.getpid()}
            ), self._request_shutdown
        assert request.request is not None
        deadline = request.request.deadline or self._deadline
        result = await ask(self._service, request.request, deadline)
        if isinstance(result, Err):
            return encode_error(request.id, result.code, result.reason), None
        return encode_ok(request.id, result.value), None
