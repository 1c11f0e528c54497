"""The control actor over a real Unix socket, in-process with an in-memory node."""

from __future__ import annotations

import os
import shutil
import struct
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from actors.control import ControlActor, check_peer
from actors.node import open_node
from actors.runtime import ActorSpec, reuse
from dmgn import api
from dmgn.control_protocol import (
    MAX_FRAME_BYTES,
    OP_PING,
    OP_SHUTDOWN,
    FrameDecoder,
    decode_response,
    encode_request,
)
from dmgn.embedding import HashingEmbedder
from dmgn.errors import DmgnError


@pytest.fixture
def socket_path() -> Iterator[Path]:
    # Short on purpose: a Unix socket path must fit in 107 bytes, pytest's tmp_path may not.
    directory = Path(tempfile.mkdtemp(prefix="dmgn-"))
    yield directory / "control.sock"
    shutil.rmtree(directory, ignore_errors=True)


@asynccontextmanager
async def control_node(path: Path, **options: Any) -> AsyncIterator[trio.Event]:
    """A node with vault, store (in memory), service and control actor; yields its stop event.

    The lexical embedder keeps these tests about the socket, not about model inference.
    """
    async with open_node(os.urandom(32), os.urandom(16), None, embedder=HashingEmbedder()) as node:
        stop = trio.Event()
        actor = ControlActor(
            path,
            node.service,
            describe=lambda: {"pid": os.getpid()},
            request_shutdown=stop.set,
            **options,
        )
        await node.supervisor.start(ActorSpec("control", reuse(actor)))
        yield stop


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()
        self.pending: list[bytes] = []

    @classmethod
    async def connect(cls, path: Path) -> Client:
        return cls(await trio.open_unix_socket(str(path)))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> tuple[int | None, dict[str, Any] | DmgnError]:
        while not self.pending:
            data = await self.stream.receive_some(65536)
            if not data:
                raise EOFError
            self.pending.extend(self.decoder.receive_data(data))
        return decode_response(self.pending.pop(0))

    async def request(self, request_id: int, body: api.AnyRequest | str) -> dict[str, Any]:
        await self.send(encode_request(request_id, body))
        answered, response = await self.receive()
        assert answered == request_id
        assert isinstance(response, dict), response
        return response

    async def closed_by_server(self) -> bool:
        try:
            return await self.stream.receive_some(65536) == b""
        except trio.BrokenResourceError:  # closed with our request unread: a reset
            return True


def frame(document: object) -> bytes:
    payload = msgpack.packb(document)
    return struct.pack(">I", len(payload)) + payload


async def test_socket_file_is_private_and_removed_at_shutdown(socket_path: Path) -> None:
    async with control_node(socket_path):
        assert os.stat(socket_path).st_mode & 0o777 == 0o600
    assert socket_path.name not in os.listdir(socket_path.parent)


async def test_thousand_requests_from_fifty_clients_with_malformed_frames_interleaved(
    socket_path: Path,
) -> None:
    clients, per_client = 50, 20  # 50 x 20 = 1,000 requests

    async def honest(number: int) -> None:
        client = await Client.connect(socket_path)
        ids = []
        for i in range(2):
            ids.append((await client.request(i, api.AddMemory(content=f"{number}/{i}")))["id"])
        # The rest pipelined: all requests go out before any answer is read; answers come back
        # in order, each carrying its request's id.
        requests: list[api.AnyRequest] = [
            api.GetMemory(id=ids[k % 2]) if k % 3 == 0 else api.Status()
            for k in range(per_client - 2)
        ]
        for k, request in enumerate(requests, start=100):
            await client.send(encode_request(k, request))
        for k, request in enumerate(requests, start=100):
            answered, response = await client.receive()
            assert answered == k and isinstance(response, dict)
            if isinstance(request, api.GetMemory):
                assert response["id"] == request.id
                assert response["content"] == f"{number}/{ids.index(request.id)}"
            else:
                assert response["memories"] >= 2 and response["mode"] == "offline"
        await client.stream.aclose()

    async def hostile(number: int) -> None:
        # Garbage, then a valid request on the same connection: the connection survives.
        client = await Client.connect(socket_path)
        await client.send(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
        answered, error = await client.receive()
        assert answered is None and isinstance(error, DmgnError) and error.code == "bad_request"
        for document, code in [
            ({"v": 1, "id": 1, "req": {"op": "drop_tables"}}, "invalid_input"),
            ({"v": 9, "id": 2, "req": {"op": "status"}}, "unsupported_version"),
            ({"v": 1, "id": 3, "req": {"op": "add", "content": 5}}, "invalid_input"),
            ({"v": 1, "id": 4, "req": "status"}, "invalid_input"),
            ([1, 2], "bad_request"),
        ]:
            await client.send(frame(document))
            answered, error = await client.receive()
            assert isinstance(error, DmgnError) and error.code == code, (document, error)
        assert "memories" in await client.request(5, api.Status())
        await client.stream.aclose()
        # An impossible length: one error, then this connection (only) is closed.
        client = await Client.connect(socket_path)
        await client.send(struct.pack(">I", MAX_FRAME_BYTES + 1) + b"x" * 100)
        _, error = await client.receive()
        assert isinstance(error, DmgnError) and error.code == "protocol_error"
        assert await client.closed_by_server()
        # Half a frame, then hang up.
        client = await Client.connect(socket_path)
        await client.send(encode_request(number, api.Status())[:7])
        await client.stream.aclose()

    async with control_node(socket_path):
        async with trio.open_nursery() as nursery:
            for number in range(clients):
                nursery.start_soon(honest, number)
                if number % 5 == 0:
                    nursery.start_soon(hostile, number)
        client = await Client.connect(socket_path)
        status = await client.request(1, api.Status())
        assert status["memories"] == clients * 2


async def test_typed_errors_come_back_through_the_socket(socket_path: Path) -> None:
    async with control_node(socket_path):
        client = await Client.connect(socket_path)
        await client.send(encode_request(1, api.GetMemory(id="ffff")))
        _, error = await client.receive()
        assert isinstance(error, DmgnError) and error.code == "not_found"


async def test_peer_with_another_uid_is_refused(socket_path: Path) -> None:
    async with control_node(socket_path, allowed_uid=os.getuid() + 1):
        client = await Client.connect(socket_path)
        await client.send(encode_request(1, OP_PING))
        _, error = await client.receive()
        assert isinstance(error, DmgnError) and error.code == "permission_denied"
        assert "refused" in str(error)
        assert await client.closed_by_server()


def test_check_peer_allows_only_the_owner() -> None:
    assert check_peer(1000, 1000) is None
    assert "uid 1001" in (check_peer(1001, 1000) or "")


CHILD_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES"); sys.exit()
try:  # the refusal is sent at once; our request may hit a closed socket
    s.sendall(bytes.fromhex(sys.argv[2]))
except OSError:
    pass
print(s.recv(65536).hex())
"""


#: The venv's interpreter may live under /root; another user needs one it can execute.
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/usr/local/bin:/bin") or sys.executable


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
async def test_process_of_another_user_is_refused_by_kernel_and_by_peer_check(
    socket_path: Path,
) -> None:
    def as_nobody() -> None:
        os.setgid(65534)
        os.setgroups([])
        os.setuid(65534)

    async def child_says() -> str:
        done = await trio.run_process(
            [
                SYSTEM_PYTHON,
                "-I",
                "-c",
                CHILD_CLIENT,
                str(socket_path),
                encode_request(1, OP_PING).hex(),
            ],
            capture_stdout=True,
            preexec_fn=as_nobody,
            cwd="/",
        )
        return done.stdout.decode().strip()

    async with control_node(socket_path):
        # First fence: the 0700 directory and 0600 socket; the kernel says no.
        assert await child_says() == "EACCES"
        # With the file fences loosened by hand, SO_PEERCRED still refuses.
        os.chmod(socket_path.parent, 0o755)
        os.chmod(socket_path, 0o666)
        answer = bytes.fromhex(await child_says())
        (payload,) = FrameDecoder().receive_data(answer)
        _, error = decode_response(payload)
        assert isinstance(error, DmgnError) and error.code == "permission_denied"


async def test_connections_over_the_cap_are_told_busy(socket_path: Path) -> None:
    async with control_node(socket_path, max_connections=2):
        held = [await Client.connect(socket_path) for _ in range(2)]
        for client in held:
            assert (await client.request(1, OP_PING))["pid"] == os.getpid()
        extra = await Client.connect(socket_path)
        _, error = await extra.receive()
        assert isinstance(error, DmgnError) and error.code == "busy"
        await held[0].stream.aclose()
        # A slot frees once the server has seen the hang-up.
        while True:
            retry = await Client.connect(socket_path)
            await retry.send(encode_request(2, OP_PING))
            _, answer = await retry.receive()
            if isinstance(answer, dict):
                break
            await trio.sleep(0.01)


async def test_idle_connection_is_closed(socket_path: Path) -> None:
    async with control_node(socket_path, idle_timeout=0.05):
        client = await Client.connect(socket_path)
        assert await client.closed_by_server()


async def test_shutdown_request_is_answered_then_signalled(socket_path: Path) -> None:
    async with control_node(socket_path) as stop:
        client = await Client.connect(socket_path)
        assert (await client.request(1, OP_SHUTDOWN))["stopping"] is True
        await stop.wait()


def test_socket_path_too_long_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DmgnError, match="107 bytes"):
        ControlActor(
            tmp_path / ("x" * 120),
            None,  # type: ignore[arg-type]
            describe=dict,
            request_shutdown=lambda: None,
        )
