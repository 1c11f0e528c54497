"""The MCP socket under malformed messages: every field of every message, wrong-typed.

A seeded generator starts from valid JSON-RPC messages (initialize, ping, tools/list, a call of
each tool with valid arguments, resources/read, notifications) and replaces the value at one or
more positions - ``jsonrpc``, ``id``, ``method``, ``params`` and an unknown key, the tool name,
each argument, and items inside list and map arguments - with a JSON value of another type
(null, bools, huge and negative numbers, strings, lists, objects); a few lines are not JSON at all.
After each message a ``ping`` with a fresh id must be answered on the same connection, so a
session that died or hung is caught at the message that did it, and no actor may crash.

Message count comes from ``DMGN_FUZZ_FRAMES`` (default 300). The 10,000-message run reported in
docs/security.md is::

    DMGN_FUZZ_FRAMES=10000 .venv/bin/pytest -q tests/mcp/test_mcp_fuzz.py
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from actors.mcp_bridge import McpBridge
from actors.node import open_node
from actors.runtime import ActorSpec, reuse
from dmgn.embedding import HashingEmbedder
from dmgn.paths import DataDir

FRAMES = int(os.environ.get("DMGN_FUZZ_FRAMES", "300"))
MEMORY_ID = "ab" * 32

INITIALIZE: dict[str, Any] = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "fuzz", "version": "1"},
    },
}

TOOL_ARGUMENTS: dict[str, dict[str, Any]] = {
    "add_memory": {
        "content": "fuzz",
        "type": "text",
        "links": [MEMORY_ID],
        "embedding": [0.1, 0.2],
        "metadata": {"k": "v"},
    },
    "query_memory": {
        "query": "fuzz",
        "embedding": [0.1, 0.2],
        "limit": 3,
        "include_content": True,
        "filter_type": "text",
        "filter_after": "2025-01-01",
        "filter_before": 2**62,
    },
    "get_context": {"limit": 2},
    "link_memories": {"from_id": MEMORY_ID, "to_id": MEMORY_ID, "weight": 1.0, "edge_type": "x"},
    "get_graph": {"start_id": MEMORY_ID, "max_depth": 1},
    "delete_memory": {"id": MEMORY_ID},
    "get_status": {},
    "load_skill": {},
    "add_node": {"name": "n", "node_type": "t", "description": "d", "properties": {"a": "b"}},
    "add_edge": {"from_id": MEMORY_ID, "to_id": MEMORY_ID, "relation": "r", "weight": 1.0},
    "query_graph": {"query": "fuzz", "max_depth": 1},
}


def valid_messages() -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [
        INITIALIZE,
        {"jsonrpc": "2.0", "id": 1, "method": "ping"},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}},
        {"jsonrpc": "2.0", "id": 1, "method": "resources/list", "params": {}},
        {"jsonrpc": "2.0", "id": 1, "method": "resources/templates/list"},
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "resources/read",
            "params": {"uri": f"dmgn://memory/{MEMORY_ID}"},
        },
        {"jsonrpc": "2.0", "id": 1, "method": "resources/read", "params": {"uri": "dmgn://status"}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}},
        {"jsonrpc": "2.0", "id": 1, "result": {}},
    ]
    for name, arguments in TOOL_ARGUMENTS.items():
        messages.append(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "tools/call",
                "params": {"name": name, "arguments": arguments},
            }
        )
    return messages


VALID = valid_messages()


def wrong_values(rng: random.Random) -> list[Any]:
    return [
        None,
        True,
        False,
        0,
        -1,
        2**31,
        2**63,
        -(2**64),
        10**40,
        1.5,
        -0.0,
        1e308,
        "",
        "x",
        "ping",
        "tools/call",
        "\x00\u202e",
        "é" * rng.randint(1, 300),
        MEMORY_ID,
        MEMORY_ID[:6],
        "2025-13-45T99:99",
        [],
        [None],
        [1, "a", None],
        [[1]],
        [{"k": "v"}],
        ["x"] * rng.randint(0, 300),
        {},
        {"name": "get_status"},
        {"": None},
        {"k": ["v"]},
        {"k": {"k": "v"}},
    ]


def mutate(document: Any, rng: random.Random) -> Any:
    """Replace the value at one random position of ``document`` (recursing into containers)."""
    if isinstance(document, dict) and document and rng.random() < 0.9:
        key = rng.choice([*document, "unexpected"])
        if key in document and isinstance(document[key], dict | list) and rng.random() < 0.6:
            return {**document, key: mutate(document[key], rng)}
        if key in document and rng.random() < 0.1:
            return {k: v for k, v in document.items() if k != key}
        return {**document, key: rng.choice(wrong_values(rng))}
    if isinstance(document, list) and document and rng.random() < 0.9:
        index = rng.randrange(len(document))
        return [*document[:index], rng.choice(wrong_values(rng)), *document[index + 1 :]]
    return rng.choice(wrong_values(rng))


def fuzz_lines(seed: int, count: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    for number in range(count):
        roll = rng.random()
        if roll < 0.03:
            yield rng.choice([b"not json", b"{", b"[]", b"null", b'"x"', b"{}", b"\xff\xfe"])
            continue
        message: Any = {**rng.choice(VALID)}
        if "id" in message:
            message["id"] = 1000 + number
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            message = mutate(message, rng)
        yield json.dumps(message).encode()


class Connection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, message: dict[str, Any] | bytes) -> None:
        line = message if isinstance(message, bytes) else json.dumps(message).encode()
        await self.stream.send_all(line + b"\n")

    async def answer_to(self, request_id: str) -> dict[str, Any]:
        """Read lines until the response to ``request_id``; others (answers to fuzz) skipped."""
        with trio.fail_after(60):
            while True:
                while b"\n" not in self.buffer:
                    data = await self.stream.receive_some(65536)
                    assert data, "the bridge closed the session"
                    self.buffer += data
                line, self.buffer = self.buffer.split(b"\n", 1)
                answer: dict[str, Any] = json.loads(line)
                if answer.get("id") == request_id:
                    return answer


@pytest.fixture
async def bridge_socket() -> AsyncIterator[Path]:
    data_dir = Path(tempfile.mkdtemp(prefix="dmgn-fz-", dir="/tmp"))
    try:
        async with open_node(
            os.urandom(32), os.urandom(16), None, embedder=HashingEmbedder()
        ) as node:
            path = DataDir(data_dir).mcp_socket
            bridge = McpBridge(node.service, path)
            await node.supervisor.start(ActorSpec("mcp", reuse(bridge)))
            yield path
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.mark.parametrize("seed", [12, 7])
async def test_wrong_typed_fields_in_every_position_keep_the_session_and_the_bridge_alive(
    bridge_socket: Path, seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    connection = Connection(await trio.open_unix_socket(os.fspath(bridge_socket)))
    await connection.send({**INITIALIZE, "id": "init"})
    assert "result" in await connection.answer_to("init")
    await connection.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    for number, line in enumerate(fuzz_lines(seed, FRAMES)):
        await connection.send(line)
        sync = f"sync-{number}"
        await connection.send({"jsonrpc": "2.0", "id": sync, "method": "ping"})
        assert (await connection.answer_to(sync)).get("result") == {}, line
    await connection.send(
        {
            "jsonrpc": "2.0",
            "id": "last",
            "method": "tools/call",
            "params": {"name": "get_status", "arguments": {}},
        }
    )
    last = await connection.answer_to("last")
    assert last["result"]["isError"] is False, last
    crashes = [r.getMessage() for r in caplog.records if "crashed" in r.getMessage()]
    assert not crashes, crashes


@pytest.mark.parametrize(
    ("tool", "arguments", "field"),
    [
        ("add_memory", {"content": "x", "metadata": {"k": "\udc00"}}, "metadata.k"),
        ("add_memory", {"content": "x", "metadata": {"\udc00": "v"}}, "metadata"),
        ("query_memory", {"query": "heron \ud800"}, "text"),
        (
            "link_memories",
            {"from_id": MEMORY_ID, "to_id": MEMORY_ID, "edge_type": "\udc00"},
            "edge_type",
        ),
        ("\udc00", {}, ""),
    ],
)
async def test_text_that_is_not_utf8_gets_an_answer_and_the_session_carries_on(
    bridge_socket: Path,
    tool: str,
    arguments: dict[str, Any],
    field: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The official client cannot send a lone surrogate (its encoder refuses), so the line is
    # written by hand; json.dumps escapes the surrogate as \udc00, which JSON allows.
    caplog.set_level(logging.ERROR)
    connection = Connection(await trio.open_unix_socket(os.fspath(bridge_socket)))
    await connection.send({**INITIALIZE, "id": "init"})
    assert "result" in await connection.answer_to("init")
    await connection.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    for number in range(10):
        call_id = f"bad-{number}"
        await connection.send(
            {
                "jsonrpc": "2.0",
                "id": call_id,
                "method": "tools/call",
                "params": {"name": tool, "arguments": arguments},
            }
        )
        answer = await connection.answer_to(call_id)
        if "error" in answer:  # the tool name itself was not text: a JSON-RPC error
            assert "not valid UTF-8" in answer["error"]["message"], answer
            continue
        result = answer["result"]
        text = result["content"][0]["text"]
        assert result["isError"] is True and "text" in text, answer
        assert field in text, text
    await connection.send(
        {
            "jsonrpc": "2.0",
            "id": "last",
            "method": "tools/call",
            "params": {"name": "add_memory", "arguments": {"content": "still here"}},
        }
    )
    last = await connection.answer_to("last")
    assert last["result"]["isError"] is False, last
    crashes = [r.getMessage() for r in caplog.records if "crashed" in r.getMessage()]
    assert not crashes, crashes
