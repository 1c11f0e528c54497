"""`Network` over WebSocket (trio-websocket). The only module that imports it.

One WebSocket binary message carries one or two length-prefixed Noise messages
(`wire._framing.pack_frames`), so a 64 KiB application message costs one WebSocket
message; this adapter packs and unpacks them and maps names and errors:

- addresses are ``ws://host:port`` (``host:port`` is accepted when listening);
- the WebSocket message cap is `MAX_WS_MESSAGE_SIZE`, so an oversize message is
  refused by the WebSocket layer (close code 1009) before it is buffered; a
  message that is not 1-2 well-formed length-prefixed frames is a `FrameError`;
- a text message is a protocol error (we only speak binary);
- every trio-websocket/OS failure becomes `ConnectionClosed` with the reason.

No TLS: Noise provides confidentiality and authentication end to end.

Sockets are a resource strangers can take (issue 12: a plain TCP flood used every
descriptor and the store could no longer open its WAL). So the listener runs its own
accept loop and counts every TCP connection from the moment it is accepted, dialed ones
too (`SocketGuard`):

- at most `max_sockets` at once, and never more than the process's descriptor limit
  minus `FD_RESERVE` (kept for the store, logs and the local sockets);
- a connection that has not finished its WebSocket upgrade within `UPGRADE_TIMEOUT` is
  dropped; at most `MAX_UPGRADING_PER_IP` of them per remote address, and when
  `MAX_UPGRADING` are upgrading (or every socket is taken) the oldest upgrading one is
  dropped for the newcomer, so a flood of silent connections delays an honest peer by one
  upgrade at most instead of locking it out;
- one remote address may open `CONNECTIONS_PER_IP_BURST` connections at once, then one
  every 1 / `CONNECTIONS_PER_IP_RATE` seconds (the machine itself is not paced);
- a connection refused for these reasons is closed at once (its descriptor is back before
  the next accept).

Who the peer is (one of our devices or a stranger) is only known after the Noise
handshake; the transport applies those limits.
"""

from __future__ import annotations

import errno
import itertools
import resource
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import trio
import trio_websocket

from wire._errors import ConnectionClosed, FrameError
from wire._framing import MAX_FRAME_SIZE, MAX_WS_MESSAGE_SIZE, pack_frames, unpack_frames
from wire._messages import CloseCode
from wire._network import ConnectionHandler, MessageStream
from wire._nursery_errors import unwrapped
from wire._token_bucket import TokenBucket

__all__ = [
    "DEFAULT_MAX_SOCKETS",
    "DIAL_TIMEOUT",
    "FD_RESERVE",
    "MAX_UPGRADING",
    "MAX_UPGRADING_PER_IP",
    "UPGRADE_TIMEOUT",
    "SocketGuard",
    "WebSocketMessageStream",
    "WebSocketNetwork",
    "parse_ws_address",
    "socket_budget",
]

# TCP connect + HTTP upgrade on a LAN or the Internet takes well under a second;
# 10 s tolerates bad links without letting a dead address stall a dialer for long
# (trio-websocket's own default is 60 s).
DIAL_TIMEOUT = 10.0
# Time to wait for the peer's close handshake before dropping the TCP connection.
DISCONNECT_TIMEOUT = 5.0
#: The dialer pings at the WebSocket layer this often (control frames: no Noise, no actor):
#: NAT mappings and idle proxies commonly drop silent TCP flows after 30-60 s (nginx's
#: proxy_read_timeout, cloud load balancers), and a quiet storage link must stay open to hear
#: ``mail.notify``. The link's own Noise-level keepalive (actors.transport) then only has to
#: notice a dead peer, which it does on a longer clock towards strangers.
KEEPALIVE_INTERVAL = 25.0
#: A ping not answered within this closes the connection: the peer or the path is gone.
PONG_TIMEOUT = 20.0
# RFC 6455 5.5: control frame payload <= 125 bytes, minus the 2-byte close code.
_MAX_WS_CLOSE_REASON_BYTES = 123
# Bytes per socket read. trio-websocket's default (4 KiB) costs 16 reads per 64 KiB
# frame; one read per WebSocket message is measurably faster (see benchmarks/wire.py).
RECEIVE_BUFFER_BYTES = MAX_WS_MESSAGE_SIZE + 16
# Messages trio-websocket queues before it stops reading the socket (backpressure).
MESSAGE_QUEUE_SIZE = 4
#: Descriptors never given to the network: DuckDB's file, WAL and temp files, the rotating
#: logs, the control and MCP sockets and their clients (16 MCP sessions at most), the model
#: files, Zeroconf's and the DHT's sockets, with room to spare. Under a connection flood the
#: store must still be able to open its WAL (issue 12 item 6).
FD_RESERVE = 128
#: TCP connections the node holds at once in any state when the descriptor limit allows:
#: the transport's connection cap (128) plus its handshakes in progress (32) plus connections
#: still upgrading, with headroom. Each costs a descriptor and ~200 KiB of buffers at most.
DEFAULT_MAX_SOCKETS = 256
#: The fewest sockets the network gets even under a tiny descriptor limit (a few devices and
#: some strangers); below this the node cannot do its job anyway.
MIN_SOCKETS = 16
#: An HTTP upgrade is one request and one response: milliseconds. A connection that has not
#: upgraded within 5 s is silent or stalling on purpose.
UPGRADE_TIMEOUT = 5.0
#: Connections in the HTTP upgrade at once, over all remote addresses (newcomers evict the
#: oldest beyond this).
MAX_UPGRADING = 64
#: Connections in the HTTP upgrade at once from one remote address: an honest node dials
#: one at a time; a few cover NAT-shared addresses.
MAX_UPGRADING_PER_IP = 8
#: New connections one remote address may open: a burst of 4 (a few nodes behind one NAT
#: coming back together), then one every 5 s. Every connection costs us a WebSocket upgrade
#: and a Noise handshake before we know who it is; strangers refused and reconnecting at once
#: were most of what issue 12's attack still cost. Honest nodes redial with backoff.
CONNECTIONS_PER_IP_BURST = 4
CONNECTIONS_PER_IP_RATE = 0.2
#: The machine itself is not paced: only a local process can connect from there (a local user
#: can do more than this anyway), and tools and tests on one machine connect often.
_UNPACED = frozenset({"127.0.0.1", "::1"})
#: Remote addresses whose connection rate is remembered (least recently seen forgotten first).
_TRACKED_ADDRESSES = 4096


def socket_budget(max_sockets: int = DEFAULT_MAX_SOCKETS, reserve: int = FD_RESERVE) -> int:
    """How many sockets the network may hold: ``max_sockets`` within the descriptor limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_sockets
    return max(MIN_SOCKETS, min(max_sockets, soft - reserve))


class _ReaderNursery:
    """Runs trio-websocket's reader task shielded from cancellation until `stop`.

    Closing a WebSocket waits for the peer's close frame, which only the reader task can
    receive; when the whole node is being cancelled that task would be cancelled first and
    every close would wait out `DISCONNECT_TIMEOUT`. So the reader runs shielded and is
    stopped explicitly once the connection is closed.
    """

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._scopes: list[trio.CancelScope] = []
        #: Cancelled when a reader task ends (see `_open`: the upgrade waits on it).
        self.upgrade_scope = trio.CancelScope()

    def start_soon(self, function: Callable[[], Awaitable[object]]) -> None:
        scope = trio.CancelScope(shield=True)
        self._scopes.append(scope)

        async def shielded() -> None:
            try:
                with scope:
                    await function()
            finally:
                # The reader ends when the socket does. trio-websocket's client upgrade waits
                # for the server's answer without watching for that, so a server that closes
                # the socket at once (a full node: `SocketGuard`) held a dial for the whole
                # dial timeout.
                self.upgrade_scope.cancel()

        self._nursery.start_soon(shielded)

    def stop(self) -> None:
        for scope in self._scopes:
            scope.cancel()


@dataclass(eq=False)
class _Slot:
    ip: str
    inbound: bool
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    upgrading: bool = True
    released: bool = False


class SocketGuard:
    """Counts the network's sockets and decides which connection may have one (sans-IO).

    Counters (``refused``, ``evicted``) are for status pages and tests.
    """

    def __init__(
        self,
        max_sockets: int,
        *,
        max_upgrading: int = MAX_UPGRADING,
        max_upgrading_per_ip: int = MAX_UPGRADING_PER_IP,
    ) -> None:
        self.max_sockets = max_sockets
        self._max_upgrading = max_upgrading
        self._max_upgrading_per_ip = max_upgrading_per_ip
        self._open = 0
        self._upgrading: dict[int, _Slot] = {}  # insertion order = oldest first
        self._upgrading_per_ip: Counter[str] = Counter()
        self._ids = itertools.count()
        self._slot_ids: dict[_Slot, int] = {}
        self._arrivals: OrderedDict[str, TokenBucket] = OrderedDict()  # ip -> connections
        self.refused = 0
        self.paced = 0
        self.evicted = 0

    @property
    def open(self) -> int:
        return self._open

    @property
    def upgrading(self) -> int:
        return len(self._upgrading)

    def _arrival_allowed(self, ip: str, now: float) -> bool:
        if ip in _UNPACED:
            return True
        arrivals = self._arrivals.pop(ip, None)
        if arrivals is None:
            arrivals = TokenBucket(CONNECTIONS_PER_IP_RATE, float(CONNECTIONS_PER_IP_BURST))
        self._arrivals[ip] = arrivals
        allowed = arrivals.take(1.0, now)
        while len(self._arrivals) > _TRACKED_ADDRESSES:
            self._arrivals.popitem(last=False)
        return allowed

    def admit(self, ip: str, *, inbound: bool = True, now: float = 0.0) -> _Slot | None:
        """A slot for a new connection from (or to) ``ip``, or None: close it at once.

        ``now`` (any monotonic clock) paces new inbound connections per address."""
        if inbound and not self._arrival_allowed(ip, now):
            self.paced += 1
            self.refused += 1
            return None
        if inbound and self._upgrading_per_ip[ip] >= self._max_upgrading_per_ip:
            self.refused += 1
            return None
        if inbound and len(self._upgrading) >= self._max_upgrading:
            self._evict_oldest()
        if self._open >= self.max_sockets and not (inbound and self._evict_oldest()):
            self.refused += 1
            return None
        slot = _Slot(ip, inbound, upgrading=inbound)
        self._open += 1
        if inbound:
            slot_id = next(self._ids)
            self._slot_ids[slot] = slot_id
            self._upgrading[slot_id] = slot
            self._upgrading_per_ip[ip] += 1
        return slot

    def upgraded(self, slot: _Slot) -> None:
        """The connection speaks WebSocket now; it is no longer evicted for newcomers."""
        if slot.upgrading:
            slot.upgrading = False
            self._upgrading.pop(self._slot_ids[slot], None)
            self._forget_ip(slot.ip)

    def release(self, slot: _Slot) -> None:
        """The connection's socket is closed (idempotent)."""
        if slot.released:
            return
        self.upgraded(slot)
        slot.released = True
        self._slot_ids.pop(slot, None)
        self._open -= 1

    def _evict_oldest(self) -> bool:
        for slot in self._upgrading.values():
            if slot.inbound:
                self.evicted += 1
                slot.scope.cancel()
                self.release(slot)
                return True
        return False

    def _forget_ip(self, ip: str) -> None:
        self._upgrading_per_ip[ip] -= 1
        if self._upgrading_per_ip[ip] <= 0:
            del self._upgrading_per_ip[ip]


def parse_ws_address(address: str) -> tuple[str, int]:
    """``ws://host:port`` or ``host:port`` -> (host, port)."""
    url = urlsplit(address if "://" in address else f"ws://{address}")
    if url.scheme != "ws" or not url.hostname or url.port is None:
        raise ValueError(f"not a ws://host:port address: {address!r}")
    return url.hostname, url.port


def _dial_failure(error: BaseException) -> str:
    """Why a dial failed, in words. trio-websocket's ``HandshakeError`` has no message of its
    own and trio's "all attempts failed" hides each attempt's errno in its cause, so walk the
    causes (and the attempts) for the most specific reason: "Connection refused", a timeout."""
    reasons: list[str] = []
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            reasons.append(current.strerror)
        elif isinstance(current, trio_websocket.ConnectionTimeout | trio.TooSlowError):
            reasons.append("timed out")
        elif isinstance(current, trio_websocket.ConnectionRejected):
            reasons.append(f"the server refused the WebSocket upgrade ({current})")
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        if current.__cause__ is not None:
            pending.append(current.__cause__)
    if reasons:
        return "; ".join(dict.fromkeys(reasons))
    return str(error) or type(error).__name__


def _close_reason(reason: trio_websocket.CloseReason | None) -> str:
    if reason is None:
        return "connection closed"
    return f"connection closed ({reason.code} {reason.name}): {reason.reason or ''}".rstrip(": ")


def _close_code(reason: trio_websocket.CloseReason | None) -> int | None:
    return None if reason is None else reason.code


class WebSocketMessageStream:
    """A `MessageStream` over one trio-websocket connection."""

    def __init__(self, connection: trio_websocket.WebSocketConnection) -> None:
        self._connection = connection
        self._pending: list[memoryview] = []
        #: WebSocket messages sent and received (each carries one or two frames).
        self.ws_messages_sent = 0
        self.ws_messages_received = 0
        remote = connection.remote
        self._remote_address = (
            f"ws://{remote.address}:{remote.port}"
            if isinstance(remote, trio_websocket.Endpoint)
            else str(remote)
        )

    @property
    def remote_address(self) -> str:
        return self._remote_address

    async def send_message(self, data: bytes) -> None:
        await self.send_messages([data])

    async def send_messages(self, data: list[bytes]) -> None:
        for frame in data:
            if len(frame) > MAX_FRAME_SIZE:
                raise FrameError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_SIZE}")
        try:
            for payload in pack_frames(data):
                await self._connection.send_message(payload)
                self.ws_messages_sent += 1
        except trio_websocket.ConnectionClosed as exc:
            raise ConnectionClosed(_close_reason(exc.reason), _close_code(exc.reason)) from exc

    async def receive_message(self) -> bytes | memoryview:
        if not self._pending:
            try:
                message = await self._connection.get_message()
            except trio_websocket.ConnectionClosed as exc:
                raise ConnectionClosed(_close_reason(exc.reason), _close_code(exc.reason)) from exc
            if isinstance(message, str):
                raise FrameError("text WebSocket message (only binary frames are allowed)")
            self.ws_messages_received += 1
            self._pending = unpack_frames(message)
        return self._pending.pop(0)

    async def aclose(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        short = reason.encode("utf-8")[:_MAX_WS_CLOSE_REASON_BYTES].decode("utf-8", "ignore")
        # trio-websocket waits for the peer's close frame without a deadline, and that frame is
        # read by a task that may already be cancelled (node shutdown): callers close under a
        # shield, so without this bound the close would hang forever. The TCP stream is closed
        # either way.
        with trio.move_on_after(DISCONNECT_TIMEOUT):
            await self._connection.aclose(code, short)


class WebSocketNetwork:
    """Production `Network`: plain WebSocket on TCP, Noise inside.

    ``max_sockets=None`` takes `socket_budget()` (the descriptor limit minus `FD_RESERVE`,
    at most `DEFAULT_MAX_SOCKETS`) when first used.
    """

    def __init__(
        self,
        *,
        dial_timeout: float = DIAL_TIMEOUT,
        receive_buffer_bytes: int = RECEIVE_BUFFER_BYTES,
        message_queue_size: int = MESSAGE_QUEUE_SIZE,
        max_sockets: int | None = None,
        upgrade_timeout: float = UPGRADE_TIMEOUT,
        max_upgrading: int = MAX_UPGRADING,
        max_upgrading_per_ip: int = MAX_UPGRADING_PER_IP,
        source_address: str | None = None,
        keepalive_interval: float = KEEPALIVE_INTERVAL,
        pong_timeout: float = PONG_TIMEOUT,
    ) -> None:
        """``source_address``: the local IP dials leave from (multi-homed hosts; tests and
        benchmarks use 127.0.0.x to play peers at different addresses). Connections this
        network dials are pinged every ``keepalive_interval`` and closed when a ping goes
        unanswered for ``pong_timeout`` (`KEEPALIVE_INTERVAL`)."""
        self._source_address = source_address
        self._keepalive_interval = keepalive_interval
        self._pong_timeout = pong_timeout
        self._dial_timeout = dial_timeout
        self._receive_buffer_bytes = receive_buffer_bytes
        self._message_queue_size = message_queue_size
        self._upgrade_timeout = upgrade_timeout
        self.guard = SocketGuard(
            socket_budget() if max_sockets is None else max_sockets,
            max_upgrading=max_upgrading,
            max_upgrading_per_ip=max_upgrading_per_ip,
        )

    async def listen(
        self,
        address: str,
        handler: ConnectionHandler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        host, port = parse_ws_address(address)
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]

        async def serve_one(stream: trio.SocketStream) -> None:
            await self._serve_socket(stream, handler)

        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, serve_one, listeners)
            task_status.started(f"ws://{host}:{bound}")

    async def _serve_socket(self, stream: trio.SocketStream, handler: ConnectionHandler) -> None:
        try:
            ip = str(stream.socket.getpeername()[0])
        except OSError:
            await trio.aclose_forcefully(stream)
            return  # the peer is already gone
        slot = self.guard.admit(ip, now=trio.current_time())
        if slot is None:
            await trio.aclose_forcefully(stream)
            return
        try:
            with slot.scope:
                async with trio.open_nursery() as nursery:
                    readers = _ReaderNursery(nursery)
                    try:
                        connection = await self._upgrade(readers, stream)
                        if connection is not None:
                            self.guard.upgraded(slot)
                            message_stream = WebSocketMessageStream(connection)
                            try:
                                await handler(message_stream)
                            finally:
                                with trio.CancelScope(shield=True):
                                    await message_stream.aclose()
                    finally:
                        readers.stop()
        finally:
            self.guard.release(slot)
            await trio.aclose_forcefully(stream)

    async def _upgrade(
        self, readers: _ReaderNursery, stream: trio.SocketStream
    ) -> trio_websocket.WebSocketConnection | None:
        """The HTTP upgrade, under `UPGRADE_TIMEOUT`; None if the peer did not finish it."""
        with trio.move_on_after(self._upgrade_timeout):
            try:
                request = await trio_websocket.wrap_server_stream(
                    cast(trio.Nursery, readers),
                    stream,
                    message_queue_size=self._message_queue_size,
                    max_message_size=MAX_WS_MESSAGE_SIZE,
                    receive_buffer_size=self._receive_buffer_bytes,
                )
                return await request.accept()
            except (trio_websocket.ConnectionClosed, trio.BrokenResourceError):
                return None  # the dialer left (or spoke no HTTP) during the upgrade
        return None

    @asynccontextmanager
    async def dial(self, address: str) -> AsyncIterator[MessageStream]:
        host, port = parse_ws_address(address)
        slot = self.guard.admit(host, inbound=False)
        if slot is None:
            raise ConnectionClosed(
                f"cannot connect to {address}: this node holds as many connections as it may "
                f"({self.guard.max_sockets}); retry later"
            )
        connected = False
        try:
            async with self._open(host, port) as connection:
                connected = True
                yield WebSocketMessageStream(connection)
        except (OSError, trio_websocket.HandshakeError, trio.TooSlowError) as exc:
            if connected:
                raise
            raise ConnectionClosed(f"cannot connect to {address}: {_dial_failure(exc)}") from exc
        finally:
            self.guard.release(slot)

    async def _keep_alive(self, connection: trio_websocket.WebSocketConnection) -> None:
        """Ping ``connection`` every keepalive interval; close it when a pong does not come.

        Runs beside trio-websocket's reader (stopped with it, see `_open`). The peer's reader
        answers pings by itself, so a pong says the peer's process and the path are alive."""
        while True:
            await trio.sleep(self._keepalive_interval)
            with trio.move_on_after(self._pong_timeout) as waiting:
                try:
                    await connection.ping()
                except (trio_websocket.ConnectionClosed, trio.BrokenResourceError):
                    return
            if waiting.cancelled_caught:
                with trio.move_on_after(DISCONNECT_TIMEOUT):
                    await connection.aclose(
                        CloseCode.GOING_AWAY, f"no pong within {self._pong_timeout:g}s"
                    )
                return

    async def _connect(self, host: str, port: int) -> trio.SocketStream:
        with trio.fail_after(self._dial_timeout):
            if self._source_address is None:
                return await trio.open_tcp_stream(host, port)
            sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
            try:
                await sock.bind((self._source_address, 0))
                await sock.connect((host, port))
            except BaseException:
                sock.close()
                raise
            return trio.SocketStream(sock)

    @asynccontextmanager
    async def _open(
        self, host: str, port: int
    ) -> AsyncIterator[trio_websocket.WebSocketConnection]:
        """TCP connect and WebSocket upgrade (each under the dial timeout), then the
        connection; closed (close handshake included) when the block ends."""
        stream = await self._connect(host, port)
        try:
            # The one exception of a dial's body leaves as itself, not inside the group the
            # reader's nursery wraps it in (callers catch `WireError`, as with any `Network`).
            with unwrapped():
                async with trio.open_nursery() as nursery:
                    readers = _ReaderNursery(nursery)
                    try:
                        with trio.fail_after(self._dial_timeout), readers.upgrade_scope:
                            connection = await trio_websocket.wrap_client_stream(
                                cast(trio.Nursery, readers),
                                stream,
                                host,
                                "/",
                                message_queue_size=self._message_queue_size,
                                max_message_size=MAX_WS_MESSAGE_SIZE,
                                receive_buffer_size=self._receive_buffer_bytes,
                            )
                        if readers.upgrade_scope.cancelled_caught:
                            raise ConnectionResetError(
                                errno.ECONNRESET,
                                "the server closed the connection during the upgrade",
                            )
                        readers.start_soon(lambda: self._keep_alive(connection))
                        try:
                            yield connection
                        finally:
                            with (
                                trio.CancelScope(shield=True),
                                trio.move_on_after(DISCONNECT_TIMEOUT),
                            ):
                                await connection.aclose()
                    finally:
                        readers.stop()
        finally:
            await trio.aclose_forcefully(stream)
