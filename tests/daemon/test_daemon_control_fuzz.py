"""The control socket under malformed frames: every field of every request, wrong-typed.

A seeded generator (reproducible: the seed is in the test id) starts from a valid request of
each kind and replaces the value at one or more positions - the envelope's ``v``, ``id``, ``req``
and an unknown key, the request's ``op`` and each of its fields, and items inside list and map
fields - with a value of another type (nil, bools, huge and negative ints, NaN and infinities,
strings, bytes, lists, maps, msgpack extension types). Every frame must get an answer carrying
its id, on the same connection, and no actor may crash.

Frame count comes from ``DMGN_FUZZ_FRAMES`` (default 300 for the normal run). The 10,000-frame
run reported in docs/security.md is::

    DMGN_FUZZ_FRAMES=10000 .venv/bin/pytest -q tests/daemon/test_daemon_control_fuzz.py
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from actors.control import ControlActor
from actors.node import open_node
from actors.runtime import ActorSpec, reuse
from dmgn.control_protocol import OP_PING, OP_SHUTDOWN, FrameDecoder, decode_response
from dmgn.embedding import HashingEmbedder
from dmgn.errors import DmgnError

FRAMES = int(os.environ.get("DMGN_FUZZ_FRAMES", "300"))
MEMORY_ID = "ab" * 32

#: A valid body for every request kind; the generator breaks them.
VALID: list[dict[str, Any]] = [
    {
        "op": "add",
        "content": "fuzz",
        "type": "text",
        "links": [MEMORY_ID],
        "metadata": {"k": "v"},
        "embedding": [0.1, 0.2, 0.3],
        "link_type": "related",
    },
    {
        "op": "query",
        "text": "fuzz",
        "embedding": [0.1, 0.2, 0.3],
        "limit": 5,
        "types": ["text"],
        "after": 0,
        "before": 2**62,
        "links_of": MEMORY_ID,
        "alpha": 0.5,
        "include_content": True,
        "recent": False,
    },
    {"op": "get", "id": MEMORY_ID},
    {"op": "delete", "id": MEMORY_ID},
    {"op": "link", "from_id": MEMORY_ID, "to_id": MEMORY_ID, "edge_type": "x", "weight": 1.0},
    {"op": "graph", "start_id": MEMORY_ID, "max_depth": 2},
    {"op": "context", "limit": 3},
    {"op": "status"},
    {"op": "peers"},
    {"op": OP_PING},
]


def wrong_values(rng: random.Random) -> list[Any]:
    """Values of every type msgpack can carry, including the edge cases of each."""
    return [
        None,
        True,
        False,
        0,
        -1,
        7,
        2**31,
        2**63 - 1,
        -(2**63),
        2**64 - 1,
        1.5,
        -0.0,
        math.nan,
        math.inf,
        -math.inf,
        1e308,
        "",
        "x",
        "status",
        OP_SHUTDOWN if rng.random() < 0.01 else OP_PING,
        "\x00\ud7ff\u202e",
        "é" * rng.randint(1, 300),
        MEMORY_ID,
        MEMORY_ID[:6],
        b"",
        b"\xff\xfe",
        [],
        [None],
        [1, "a", None],
        [[1]],
        [{"op": "status"}],
        [math.nan],
        ["x"] * rng.randint(0, 300),
        {},
        {"op": "status"},
        {"op": [1]},
        {"": None},
        {"k": ["v"]},
        {"k": {"k": "v"}},
        msgpack.ExtType(5, b"ext"),
        msgpack.Timestamp(0, 0),
    ]


def mutate(document: Any, rng: random.Random) -> Any:
    """Replace the value at one random position of ``document`` (recursing into containers)."""
    if isinstance(document, dict) and document and rng.random() < 0.9:
        key = rng.choice([*document, "unexpected"])
        if key in document and isinstance(document[key], dict | list) and rng.random() < 0.5:
            return {**document, key: mutate(document[key], rng)}
        if key in document and rng.random() < 0.1:
            return {k: v for k, v in document.items() if k != key}  # a missing field
        return {**document, key: rng.choice(wrong_values(rng))}
    if isinstance(document, list) and document and rng.random() < 0.9:
        index = rng.randrange(len(document))
        return [*document[:index], rng.choice(wrong_values(rng)), *document[index + 1 :]]
    return rng.choice(wrong_values(rng))


def fuzz_frames(seed: int, count: int) -> Iterator[tuple[int | None, bytes]]:
    """``count`` frames: (the id the answer must carry, or None if it was broken; bytes)."""
    rng = random.Random(seed)
    for number in range(count):
        body = dict(rng.choice(VALID))
        document: dict[str, Any] = {"v": 1, "id": number, "req": body}
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            if rng.random() < 0.8:
                document = {**document, "req": mutate(document["req"], rng)}
            else:  # the envelope: v, id, req itself, or an unknown key
                document = {**document, rng.choice(["v", "id", "req", "x"]): mutate(None, rng)}
        valid_envelope = set(document) <= {"v", "id", "req"} and document.get("v") == 1
        expected = number if valid_envelope and document.get("id") == number else None
        outer: Any = document
        if rng.random() < 0.02:
            outer = mutate(None, rng)  # sometimes the whole payload is not a map
            expected = None
        # Old-style msgpack (no bin type) sends bytes as str: maybe invalid UTF-8, so the id
        # may be unreadable.
        use_bin_type = rng.random() < 0.9
        payload = msgpack.packb(outer, use_bin_type=use_bin_type)
        if not use_bin_type:
            expected = None
        yield expected, struct.pack(">I", len(payload)) + payload


@pytest.fixture
def socket_path() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="dmgn-"))  # socket paths must fit in 107 bytes
    yield directory / "control.sock"
    shutil.rmtree(directory, ignore_errors=True)


class Connection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()
        self.pending: list[bytes] = []

    async def exchange(self, frame: bytes) -> tuple[int | None, dict[str, Any] | DmgnError]:
        await self.stream.send_all(frame)
        while not self.pending:
            with trio.fail_after(30):
                data = await self.stream.receive_some(65536)
            assert data, "the daemon closed the connection"
            self.pending.extend(self.decoder.receive_data(data))
        return decode_response(self.pending.pop(0))


@pytest.mark.parametrize("seed", [12, 7])
async def test_wrong_typed_fields_in_every_position_get_error_replies_and_crash_nothing(
    socket_path: Path, seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    shutdown = trio.Event()
    async with open_node(os.urandom(32), os.urandom(16), None, embedder=HashingEmbedder()) as node:
        actor = ControlActor(
            socket_path,
            node.service,
            describe=lambda: {"pid": os.getpid()},
            request_shutdown=shutdown.set,
        )
        await node.supervisor.start(ActorSpec("control", reuse(actor)))
        connection = Connection(await trio.open_unix_socket(str(socket_path)))
        answers: dict[str, int] = {}
        for expected, frame in fuzz_frames(seed, FRAMES):
            answered, response = await connection.exchange(frame)
            if expected is not None:
                assert answered == expected
            code = "ok" if isinstance(response, dict) else response.code
            answers[code] = answers.get(code, 0) + 1
            assert code != "internal", f"frame {expected} reached a bug: {response}"
        assert sum(answers.values()) == FRAMES
        assert answers.get("invalid_input", 0) + answers.get("bad_request", 0) > FRAMES // 2
        # The same connection, and the node, still serve a valid request.
        answered, status = await connection.exchange(
            struct.pack(">I", len(p := msgpack.packb({"v": 1, "id": -5, "req": {"op": "status"}})))
            + p
        )
        assert answered == -5 and isinstance(status, dict) and "memories" in status
    crashes = [r.getMessage() for r in caplog.records if "crashed" in r.getMessage()]
    assert not crashes, crashes


async def test_unhashable_op_from_issue_12_gets_an_error_reply_every_time(
    socket_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    async with open_node(os.urandom(32), os.urandom(16), None, embedder=HashingEmbedder()) as node:
        actor = ControlActor(
            socket_path, node.service, describe=lambda: {"pid": 1}, request_shutdown=lambda: None
        )
        await node.supervisor.start(ActorSpec("control", reuse(actor)))
        connection = Connection(await trio.open_unix_socket(str(socket_path)))
        payload = msgpack.packb({"v": 1, "id": 1, "req": {"op": [1]}})
        for _ in range(7):  # six crashes stopped the node before
            answered, error = await connection.exchange(struct.pack(">I", len(payload)) + payload)
            assert answered == 1 and isinstance(error, DmgnError)
            assert error.code == "invalid_input" and "'op' string" in str(error)
    assert not [r for r in caplog.records if "crashed" in r.getMessage()]
