"""The metrics endpoint: ``GET /metrics`` in the Prometheus text format, on ``metrics_addr``.

A deliberately small HTTP/1.1 server (one request per connection, ``Connection: close``) rather
than prometheus-client's threaded ``start_http_server``: it runs in the node's own nursery, so
it stops with the node, and a scrape is answered from the node's registry after a refresh of its
gauges, not from a thread racing the actors.

Bounds, because anyone who can reach the port can connect: at most :data:`MAX_CONNECTIONS` at
once, a request head of at most :data:`MAX_REQUEST_BYTES` read within :data:`REQUEST_TIMEOUT`,
nothing read beyond the head. Scrapes are served concurrently. When every slot is taken, a new
connection takes the slot of the one that has waited longest for its request head (slow or
silent clients), so a handful of them reconnecting cannot keep Prometheus out, as 16 did
(issue 30); only when all slots are busy answering is the newcomer closed unanswered.
Only ``GET /metrics`` (and ``/`` with a pointer) is served. The default address is loopback;
config decides otherwise.

This actor has no inbox: it is driven by its socket.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("dmgn.metrics")

#: Scrapers connect one at a time; a few at once covers Prometheus plus a person with curl.
MAX_CONNECTIONS = 8
#: A GET request head from Prometheus or curl is a few hundred bytes (h11 allows 16 KiB).
MAX_REQUEST_BYTES = 8 * 1024
REQUEST_TIMEOUT = 5.0
#: Prometheus' default scrape timeout is 10 s; the refresh asks a few actors for counts.
COLLECT_TIMEOUT = 10.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsEndpoint:
    def __init__(self, host: str, port: int, collect: Callable[[], Awaitable[bytes]]) -> None:
        self._host = host
        self._port = port
        self._collect = collect
        self._active = 0
        #: Connections still reading their request head, oldest first (a dict as an ordered
        #: set): the ones a newcomer may take a slot from.
        self._reading: dict[trio.CancelScope, None] = {}
        #: ``(host, port)`` actually bound (port 0 picks a free one); set once listening.
        self.bound: tuple[str, int] | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self._port, host=self._host)
        sockname = listeners[0].socket.getsockname()
        self.bound = (str(sockname[0]), int(sockname[1]))
        log.info("metrics on http://%s:%d/metrics", *self.bound)
        task_status.started()
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            reading = self._take_slot()
            if reading is None:
                return  # every slot is busy answering a scrape
            try:
                head = b""
                with reading:
                    head = await _read_head(stream)
                self._reading.pop(reading, None)
                if not reading.cancel_called:
                    await self._answer(stream, head)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the scraper went away; nothing to tell anyone
            finally:
                self._reading.pop(reading, None)
                if not reading.cancel_called:  # an evicted connection's slot went to another
                    self._active -= 1

    def _take_slot(self) -> trio.CancelScope | None:
        """A slot for a new connection, evicting the longest-waiting head reader if all are
        taken; the returned scope cancels the head read if this one is evicted in turn."""
        if self._active >= MAX_CONNECTIONS:
            if not self._reading:
                return None
            oldest = next(iter(self._reading))
            del self._reading[oldest]
            oldest.cancel()  # its slot passes to the newcomer; _active is unchanged
        else:
            self._active += 1
        reading = trio.CancelScope()
        self._reading[reading] = None
        return reading

    async def _answer(self, stream: trio.SocketStream, head: bytes) -> None:
        line = head.split(b"\r\n", 1)[0].split()
        if len(line) != 3 or not line[2].startswith(b"HTTP/") or b"\r\n\r\n" not in head:
            await _send(stream, 400, b"bad request\n")
            return
        method, target = line[0], line[1].split(b"?", 1)[0]
        if method != b"GET":
            await _send(stream, 405, b"only GET\n")
        elif target == b"/metrics":
            body = b""
            with trio.move_on_after(COLLECT_TIMEOUT):
                body = await self._collect()
            if body:
                await _send(stream, 200, body, CONTENT_TYPE)
            else:
                await _send(stream, 503, b"the node did not answer in time\n")
        elif target == b"/":
            await _send(stream, 200, b"dmgn node metrics: GET /metrics\n")
        else:
            await _send(stream, 404, b"not found; try /metrics\n")


async def _read_head(stream: trio.SocketStream) -> bytes:
    """The request head (up to MAX_REQUEST_BYTES), or what came of it in REQUEST_TIMEOUT."""
    head = b""
    with trio.move_on_after(REQUEST_TIMEOUT):
        while b"\r\n\r\n" not in head and len(head) <= MAX_REQUEST_BYTES:
            data = await stream.receive_some(4096)
            if not data:
                break
            head += data
    return head


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


async def _send(
    stream: trio.SocketStream, status: int, body: bytes, content_type: str = "text/plain"
) -> None:
    reason = _REASONS.get(status, "Service Unavailable")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with trio.move_on_after(REQUEST_TIMEOUT), contextlib.suppress(trio.BrokenResourceError):
        await stream.send_all(head + body)
