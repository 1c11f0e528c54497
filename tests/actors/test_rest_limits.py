"""The REST listener's bounds against a local flood without a token (issue 30, items 7 and 8).

A real RestActor on a loopback port, served by hypercorn, in front of a fake memory service;
the clients are raw TCP sockets, because the attacks are what a well-behaved HTTP client
never does: connect and stay silent, stop half-way through the headers or the body, or send
JSON nested thousands deep. Limits are lowered per test so that nothing waits long.
"""

from __future__ import annotations

import errno
import json
import logging
import select
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from pytest import LogCaptureFixture

from actors._peer_noise import PeerNoise
from actors.rest import ConnectionSlots, RestActor, accept_connections
from actors.runtime import Mailbox, Request
from dmgn import api
from dmgn.api_token import create_token
from wire.testing import free_port


class FakeService:
    """Answers every request with its op; while ``held`` is set, waits for it to clear first
    (so a test can keep requests in progress)."""

    def __init__(self) -> None:
        self.mailbox: Mailbox[Request[api.AnyRequest, api.Response]] = Mailbox("service")
        self.held: trio.Event | None = None
        self.waiting = 0

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            async for message in self.mailbox:
                nursery.start_soon(self._answer, message)

    async def _answer(self, message: Request[api.AnyRequest, api.Response]) -> None:
        if self.held is not None:
            self.waiting += 1
            await self.held.wait()
        message.reply.ok({"op": message.body.op})


@asynccontextmanager
async def rest_on(
    tmp_path: Path, service: FakeService | None = None, **limits: float
) -> AsyncIterator[tuple[int, str]]:
    """A RestActor on a free loopback port; yields (port, token)."""
    token = create_token(tmp_path / "api.token")
    service = service or FakeService()
    port = free_port()
    actor = RestActor(service.mailbox.address, tmp_path / "api.token", port=port, **limits)  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.run)
        await nursery.start(actor.run)
        yield port, token
        nursery.cancel_scope.cancel()


def status_request(token: str) -> bytes:
    return (f"GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n").encode()


async def read_until_closed(stream: trio.SocketStream, seconds: float = 10.0) -> bytes:
    received = b""
    with trio.fail_after(seconds):
        while chunk := await stream.receive_some(65536):
            received += chunk
    return received


async def read_response(stream: trio.SocketStream) -> tuple[int, bytes]:
    received = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in received or not received.rstrip().endswith((b"}", b"]")):
            chunk = await stream.receive_some(65536)
            assert chunk, f"the server closed the connection; got {received!r}"
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def has_data_or_eof(stream: trio.SocketStream) -> bool:
    readable, _, _ = select.select([stream.socket.fileno()], [], [], 0)
    return bool(readable)


async def test_at_the_cap_a_newcomer_takes_the_slot_of_the_longest_idle_connection(
    tmp_path: Path,
) -> None:
    async with rest_on(tmp_path, max_connections=2, idle_timeout=60.0) as (port, token):
        silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        await trio.testing.wait_all_tasks_blocked()
        client = await trio.open_tcp_stream("127.0.0.1", port)
        await client.send_all(status_request(token))
        status, body = await read_response(client)
        assert status == 200 and json.loads(body) == {"op": "status"}
        assert await read_until_closed(silent[0]) == b"", "the oldest silent one goes"
        await trio.testing.wait_all_tasks_blocked()
        assert not has_data_or_eof(silent[1]), "the younger silent one stays"
        for stream in (*silent, client):
            await stream.aclose()


async def test_connections_beyond_the_cap_wait_unaccepted_while_all_are_mid_request(
    tmp_path: Path,
) -> None:
    service = FakeService()
    service.held = trio.Event()
    async with rest_on(tmp_path, service, max_connections=2, idle_timeout=60.0) as (port, token):
        busy = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        for stream in busy:
            await stream.send_all(status_request(token))
        await trio.testing.wait_all_tasks_blocked()
        assert service.waiting == 2
        waiting = await trio.open_tcp_stream("127.0.0.1", port)  # in the kernel's backlog
        await waiting.send_all(status_request(token))
        await trio.testing.wait_all_tasks_blocked()
        assert not has_data_or_eof(waiting), "a third connection was served beyond the cap of 2"
        assert service.waiting == 2
        service.held.set()
        for stream in (*busy, waiting):
            status, _ = await read_response(stream)
            assert status == 200
            await stream.aclose()


async def test_a_silent_connection_and_one_stopped_mid_headers_are_closed_after_the_idle_timeout(
    tmp_path: Path,
) -> None:
    async with rest_on(tmp_path, idle_timeout=0.2) as (port, _token):
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        partial = await trio.open_tcp_stream("127.0.0.1", port)
        await partial.send_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
        for stream in (silent, partial):
            assert await read_until_closed(stream, seconds=5.0) == b""
            await stream.aclose()


async def test_a_body_that_stops_midway_gets_408_within_the_body_timeout(tmp_path: Path) -> None:
    async with rest_on(tmp_path, body_timeout=0.2) as (port, token):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {token}\r\nContent-Length: 100\r\n\r\n".encode()
            + b'{"text": "he'
        )
        status, body = await read_response(stream)
        answer = json.loads(body)
        assert status == 408 and answer["code"] == "request_timeout", answer
        assert "did not arrive within 0.2 s" in answer["error"]
        await read_until_closed(stream)  # and the connection is given back
        await stream.aclose()


async def test_json_nested_thousands_deep_gets_a_clear_400_and_no_traceback(
    tmp_path: Path, caplog: LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with rest_on(tmp_path) as (port, token):
        for document in (
            b"[" * 5000 + b"]" * 5000,
            b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        ):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(
                b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Authorization: Bearer {token}\r\n".encode()
                + f"Content-Length: {len(document)}\r\n\r\n".encode()
                + document
            )
            status, body = await read_response(stream)
            answer = json.loads(body)
            assert status == 400 and answer["code"] == "invalid_json", answer
            assert "nested too deeply" in answer["error"]
            await stream.aclose()
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


class _OutOfDescriptors(trio.abc.Listener[trio.SocketStream]):
    """A listener whose accept fails with EMFILE ``failures`` times, then waits forever."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.recovered = trio.Event()

    async def accept(self) -> trio.SocketStream:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(errno.EMFILE, "Too many open files")
        self.recovered.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        pass


def test_accept_out_of_descriptors_is_retried_and_logged_once_a_minute_without_traceback(
    caplog: LogCaptureFixture,
) -> None:
    # Under trio's real serve_listeners this logged a traceback at each 0.1 s retry
    # (~470 a minute in the measurement).
    clock = trio.testing.MockClock(autojump_threshold=0)
    caplog.set_level(logging.DEBUG, logger="test.rest.accept")
    listener = _OutOfDescriptors(failures=1200)  # two minutes of retries

    async def serve(stream: trio.SocketStream, slot: trio.CancelScope) -> None:
        raise AssertionError("nothing was accepted")

    async def main() -> None:
        noise = PeerNoise(logging.getLogger("test.rest.accept"), clock=trio.current_time)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_connections, listener, serve, ConnectionSlots(4), noise)
            await listener.recovered.wait()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=clock)
    lines = [r for r in caplog.records if r.name == "test.rest.accept"]
    assert 2 <= len(lines) <= 3, [r.getMessage() for r in lines]
    assert all(r.exc_info is None and r.levelno == logging.WARNING for r in lines)
    assert "EMFILE" in lines[0].getMessage() and "ulimit -n" in lines[0].getMessage()
    assert "more like it" in lines[1].getMessage()


async def read_head(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """One whole response (its Content-Length read too): (head, body)."""
    received = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in received:
            chunk = await stream.receive_some(65536)
            assert chunk, f"the server closed the connection; got {received!r}"
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        )
        while len(body) < length:
            chunk = await stream.receive_some(65536)
            assert chunk, f"the server closed the connection mid-body; got {received!r}"
            body += chunk
    return head, body


@pytest.mark.parametrize(
    ("first", "status"),
    [
        (b"POST /v1/query HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n", 401),
        (b"PUT /v1/memories HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n", 405),
        (b"POST /v1/nothing HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n", 404),
    ],
    ids=["401-no-token", "405-wrong-method", "404-no-route"],
)
async def test_an_answer_given_before_the_body_arrived_keeps_the_connection_usable(
    tmp_path: Path, first: bytes, status: int
) -> None:
    # A client (httpx) sends a POST's head and body in two writes. The server answered a 401 as
    # soon as it had the head and then closed the connection - the unread body left it
    # unusable - without saying `Connection: close`, so the client sent its next request on a
    # dead connection: "Server disconnected without sending a response" (issue 31).
    body = b'{"text": "heron"}'
    async with rest_on(tmp_path) as (port, token):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        head = first.replace(b"{token}", token.encode())
        await stream.send_all(head + f"Content-Length: {len(body)}\r\n\r\n".encode())
        await trio.testing.wait_all_tasks_blocked()  # the server has the head, not the body
        await stream.send_all(body)
        answer, _ = await read_head(stream)
        assert int(answer.split()[1]) == status
        if b"connection: close" in answer.lower():
            assert await read_until_closed(stream) == b""
        else:
            await stream.send_all(status_request(token))
            again, _ = await read_head(stream)
            assert int(again.split()[1]) == 200, "a keep-alive connection must stay usable"
        await stream.aclose()
