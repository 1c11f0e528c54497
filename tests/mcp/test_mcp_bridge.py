"""The MCP bridge, as an AI tool sees it: the official SDK client over the bridge's Unix socket,
against a real node (vault, store, service) in a temp data dir."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from mcp import ClientSession
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, TextContent, TextResourceContents

from actors.mcp_bridge import McpBridge, mcp_message_streams, parse_time_ns
from actors.node import RunningNode, open_node
from actors.runtime import ActorSpec, reuse
from dmgn.errors import InvalidInput
from dmgn.paths import DataDir

REFERENCE_TOOLS = {
    "add_memory",
    "query_memory",
    "get_context",
    "link_memories",
    "get_graph",
    "delete_memory",
    "get_status",
    "load_skill",
    "add_node",
    "add_edge",
    "query_graph",
}
#: Tools dmgn adds beyond the reference's.
EXTRA_TOOLS = {"add_memories"}


@dataclass
class Daemon:
    data_dir: Path
    socket: Path
    bridge: McpBridge
    node: RunningNode


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    # Short path under /tmp: a Unix socket path must fit in 104-108 bytes.
    data_dir = Path(tempfile.mkdtemp(prefix="dmgn-mcp-", dir="/tmp"))
    try:
        async with open_node(os.urandom(32), os.urandom(16), data_dir) as node:
            bridge = McpBridge(node.service, DataDir(data_dir).mcp_socket)
            await node.supervisor.start(ActorSpec("mcp", reuse(bridge)))
            yield Daemon(data_dir, DataDir(data_dir).mcp_socket, bridge, node)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@asynccontextmanager
async def mcp_session(socket_path: Path) -> AsyncIterator[ClientSession]:
    stream = await trio.open_unix_socket(os.fspath(socket_path))
    async with (
        stream,
        mcp_message_streams(stream) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


async def call_ok(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, _text(result)
    content: dict[str, Any] | None = result.structured_content
    assert content is not None
    return content


async def call_error(session: ClientSession, tool: str, **arguments: Any) -> str:
    result = await session.call_tool(tool, arguments)
    assert result.is_error, result
    return _text(result)


def _text(result: CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, TextContent))


# -- tools ---------------------------------------------------------------------------------


async def test_every_reference_tool_is_listed_with_schemas_an_llm_can_act_on(
    daemon: Daemon,
) -> None:
    async with mcp_session(daemon.socket) as session:
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
    assert set(tools) == REFERENCE_TOOLS | EXTRA_TOOLS
    for tool in tools.values():
        assert tool.description and len(tool.description) > 20, tool.name
        for name, prop in tool.input_schema.get("properties", {}).items():
            assert prop.get("description"), f"{tool.name}.{name} has no description"
        if tool.name != "load_skill":
            assert tool.output_schema is not None, tool.name
    add = tools["add_memory"].input_schema
    assert add["required"] == ["content"]
    assert set(add["properties"]) == {"content", "type", "links", "embedding", "metadata"}
    assert set(tools["query_memory"].input_schema["properties"]) == {
        "query",
        "embedding",
        "limit",
        "include_content",
        "filter_type",
        "filter_after",
        "filter_before",
        "recent",
    }
    assert tools["delete_memory"].annotations is not None
    assert tools["delete_memory"].annotations.destructive_hint


async def test_add_then_query_returns_the_reference_result_fields(daemon: Daemon) -> None:
    async with mcp_session(daemon.socket) as session:
        added = await call_ok(
            session,
            "add_memory",
            content="Ada prefers tabs over spaces",
            type="observation",
            metadata={"project": "atlas"},
        )
        assert set(added) >= {"id", "timestamp", "type"}
        assert len(added["id"]) == 64 and added["type"] == "observation"
        assert isinstance(added["timestamp"], int)

        found = await call_ok(session, "query_memory", query="tabs")
        assert found["count"] == 1
        (hit,) = found["results"]
        assert set(hit) == {
            "memory_id",
            "score",
            "type",
            "timestamp",
            "timestamp_rfc3339",
            "snippet",
        }
        assert hit["memory_id"] == added["id"] and hit["snippet"].startswith("Ada prefers")

        full = await call_ok(session, "query_memory", query="tabs", include_content=True)
        assert full["results"][0]["content"] == "Ada prefers tabs over spaces"
        assert "snippet" not in full["results"][0]

        typed = await call_ok(session, "query_memory", query="tabs", filter_type="document")
        assert typed == {"results": [], "count": 0}


async def test_time_filters_accept_iso8601_rfc3339_and_nanoseconds(daemon: Daemon) -> None:
    async with mcp_session(daemon.socket) as session:
        added = await call_ok(session, "add_memory", content="deploy window is friday")
        ts = added["timestamp"]
        for after, before in [
            ("2000-01-01", "2999-12-31T00:00:00Z"),
            (ts - 1, ts + 1),
            (str(ts - 1), "2999-01-01T00:00:00.000000001+02:00"),
        ]:
            found = await call_ok(
                session, "query_memory", query="deploy", filter_after=after, filter_before=before
            )
            assert found["count"] == 1, (after, before)
        assert (
            await call_ok(
                session, "query_memory", query="deploy", filter_before="2000-01-01T00:00:00Z"
            )
        )["count"] == 0
        message = await call_error(
            session, "query_memory", query="deploy", filter_after="last tuesday"
        )
        assert "filter_after must be an ISO-8601" in message


def test_parse_time_keeps_nanoseconds_and_reads_naive_times_as_utc() -> None:
    assert parse_time_ns("1970-01-01T00:00:01.000000002Z", "t") == 1_000_000_002
    assert parse_time_ns("1970-01-01T00:00:01.5", "t") == 1_500_000_000
    assert parse_time_ns("1970-01-01T01:00:00+01:00", "t") == 0
    assert parse_time_ns("1970-01-02", "t") == 86_400 * 10**9
    assert parse_time_ns(42, "t") == 42
    with pytest.raises(InvalidInput, match="t must be"):
        parse_time_ns("soon", "t")


async def test_get_context_returns_recent_memories_oldest_first(daemon: Daemon) -> None:
    async with mcp_session(daemon.socket) as session:
        for word in ("first", "second", "third"):
            await call_ok(session, "add_memory", content=f"the {word} note", metadata={"n": word})
        context = await call_ok(session, "get_context", limit=2)
    assert context["count"] == 2
    assert [m["content"] for m in context["memories"]] == ["the second note", "the third note"]
    assert set(context["memories"][0]) == {
        "id",
        "content",
        "type",
        "timestamp",
        "timestamp_rfc3339",
        "time_ago",
        "metadata",
    }
    assert context["memories"][1]["metadata"] == {"n": "third"}
    assert "2 most recent" in context["context_window_hint"]


async def test_link_memories_and_get_graph_walk_the_links(daemon: Daemon) -> None:
    async with mcp_session(daemon.socket) as session:
        a = (await call_ok(session, "add_memory", content="problem: build is slow"))["id"]
        b = (await call_ok(session, "add_memory", content="cause: no cache"))["id"]
        c = (await call_ok(session, "add_memory", content="fix: add a cache", links=[b]))["id"]
        link = await call_ok(
            session, "link_memories", from_id=b, to_id=a[:8], edge_type="causes", weight=0.5
        )
        assert {k: link[k] for k in ("from_id", "to_id", "edge_type", "created")} == {
            "from_id": b,
            "to_id": a,
            "edge_type": "causes",
            "created": True,
        }
        graph = await call_ok(session, "get_graph", start_id=a, max_depth=2)
    assert graph["root_id"] == a and graph["depth"] == 2
    assert {n["id"] for n in graph["nodes"]} == {a, b, c}
    assert {n["id"]: n["link_count"] for n in graph["nodes"]}[b] == 2
    assert set(graph["nodes"][0]) == {"id", "type", "timestamp", "timestamp_rfc3339", "link_count"}
    edges = {(e["from"], e["to"], e["type"]) for e in graph["edges"]}
    assert edges == {(b, a, "causes"), (c, b, "related")}
    assert all(set(e) >= {"from", "to", "type", "weight"} for e in graph["edges"])


async def test_deleted_memory_is_gone_from_queries_and_resources(daemon: Daemon) -> None:
    async with mcp_session(daemon.socket) as session:
        memory_id = (await call_ok(session, "add_memory", content="temporary secret plan"))["id"]
        deleted = await call_ok(session, "delete_memory", id=memory_id)
        assert deleted == {"id": memory_id, "deleted": True}
        assert (await call_ok(session, "query_memory", query="plan"))["count"] == 0
        with pytest.raises(MCPError):
            await session.read_resource(f"dmgn://memory/{memory_id}")


async def test_get_status_and_load_skill(daemon: Daemon) -> None:
    async with mcp_session(daemon.socket) as session:
        await call_ok(session, "add_memory", content="one")
        status = await call_ok(session, "get_status")
        skill = await session.call_tool("load_skill", {})
    assert status["memories"] == 1 and status["data_dir"] == str(daemon.data_dir)
    assert not skill.is_error
    text = _text(skill)
    assert "get_context" in text and "query_memory" in text and "add_node" in text


async def test_knowledge_graph_tools_map_to_memories_and_links(daemon: Daemon) -> None:
    async with mcp_session(daemon.socket) as session:
        ada = await call_ok(
            session,
            "add_node",
            name="Ada Lovelace",
            node_type="person",
            description="first programmer",
            properties={"era": "1840s"},
        )
        engine = await call_ok(session, "add_node", name="Analytical Engine", node_type="machine")
        assert ada["name"] == "Ada Lovelace" and ada["node_type"] == "person"
        edge = await call_ok(
            session, "add_edge", from_id=ada["id"], to_id=engine["id"], relation="programmed"
        )
        assert edge["relation"] == "programmed" and edge["created"] is True

        by_id = await call_ok(session, "query_graph", node_id=engine["id"], max_depth=1)
        by_text = await call_ok(session, "query_graph", query="Lovelace")
        memory = await session.read_resource(f"dmgn://memory/{ada['id']}")

        both = await call_error(session, "query_graph", node_id=ada["id"], query="Ada")
        reserved = await call_error(session, "add_node", name="x", properties={"kg": "y"})
    for graph in (by_id, by_text):
        names = {n.get("name") for n in graph["nodes"]}
        assert names == {"Ada Lovelace", "Analytical Engine"}
        assert [(e["from"], e["to"], e["type"]) for e in graph["edges"]] == [
            (ada["id"], engine["id"], "programmed")
        ]
    assert by_text["root_id"] == ada["id"] and by_text["matched_query"] == "Lovelace"
    (contents,) = memory.contents
    assert isinstance(contents, TextResourceContents)
    stored = json.loads(contents.text)
    assert stored["type"] == "observation"
    assert stored["metadata"] == {
        "kg": "node",
        "name": "Ada Lovelace",
        "node_type": "person",
        "era": "1840s",
    }
    assert "exactly one of node_id or query" in both
    assert "reserved" in reserved


async def test_invalid_arguments_are_tool_errors_with_clear_text_and_the_session_survives(
    daemon: Daemon,
) -> None:
    async with mcp_session(daemon.socket) as session:
        assert "'content' is required" in await call_error(session, "add_memory")
        assert "'type'" in await call_error(session, "add_memory", content="x", type="poem")
        assert "'limit'" in await call_error(session, "query_memory", query="x", limit=5000)
        assert "give query text" in await call_error(session, "query_memory")
        assert "embedding needs 1-" in await call_error(
            session, "add_memory", content="x", embedding=[]
        )
        assert "no memory" in await call_error(session, "get_graph", start_id="abcdef0123")
        assert "6" in await call_error(session, "delete_memory", id="ab")
        assert "cannot link to itself" in await call_error(
            session,
            "link_memories",
            **_self_link(await call_ok(session, "add_memory", content="loop")),
        )
        assert "metadata" in await call_error(session, "add_memory", content="x", metadata={"k": 3})
        unknown = await session.call_tool("no_such_tool", {})
        assert unknown.is_error and "no_such_tool" in _text(unknown)
        # Still serving after all of that.
        assert (await call_ok(session, "add_memory", content="still here"))["type"] == "text"


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _self_link(added: dict[str, Any]) -> dict[str, Any]:
    return {"from_id": added["id"], "to_id": added["id"]}


# -- resources -----------------------------------------------------------------------------


async def test_memories_are_readable_as_resources(daemon: Daemon) -> None:
    async with mcp_session(daemon.socket) as session:
        added = await call_ok(session, "add_memory", content="resource body", type="document")
        templates = (await session.list_resource_templates()).resource_templates
        listed = {str(r.uri) for r in (await session.list_resources()).resources}
        memory = await session.read_resource(f"dmgn://memory/{added['id']}")
        recent = await session.read_resource("dmgn://context/recent")
        with pytest.raises(MCPError, match="no memory"):
            await session.read_resource("dmgn://memory/" + "0" * 64)
    assert [t.uri_template for t in templates] == ["dmgn://memory/{id}"]
    assert {"dmgn://context/recent", "dmgn://status", "dmgn://skill"} <= listed
    body = memory.contents[0]
    assert isinstance(body, TextResourceContents) and body.mime_type == "application/json"
    assert json.loads(body.text)["content"] == "resource body"
    recent_body = recent.contents[0]
    assert isinstance(recent_body, TextResourceContents)
    assert [m["id"] for m in json.loads(recent_body.text)["memories"]] == [added["id"]]


# -- sessions and the socket ----------------------------------------------------------------


async def test_several_ai_tools_share_one_memory_concurrently(daemon: Daemon) -> None:
    tools = 5
    all_open = trio.Event()
    opened = 0
    seen: dict[int, int] = {}

    async def one_tool(n: int) -> None:
        nonlocal opened
        async with mcp_session(daemon.socket) as session:
            opened += 1
            if opened == tools:
                all_open.set()
            await all_open.wait()
            assert daemon.bridge.sessions == tools
            await call_ok(session, "add_memory", content=f"note from tool {n} shared")
            async with trio.open_nursery() as nursery:  # several calls in flight per session
                for _ in range(3):
                    nursery.start_soon(call_ok, session, "get_status")
            for _ in range(50):
                found = await call_ok(session, "query_memory", query="shared", limit=50)
                if found["count"] == tools:
                    break
                await trio.sleep(0.01)
            seen[n] = found["count"]

    async with trio.open_nursery() as nursery:
        for n in range(tools):
            nursery.start_soon(one_tool, n)
    assert seen == {n: tools for n in range(tools)}


async def test_sessions_beyond_the_limit_are_refused_with_a_clear_error(daemon: Daemon) -> None:
    path = daemon.data_dir / "small.sock"
    bridge = McpBridge(daemon.node.service, path, max_sessions=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(bridge.run)
        async with mcp_session(path) as first:
            refusals: list[BaseException] = []
            try:
                async with mcp_session(path):
                    pass  # pragma: no cover
            except* MCPError as group:
                refusals = _leaves(group)
            assert len(refusals) == 1
            assert "1 MCP sessions are already open" in str(refusals[0])
            assert (await call_ok(first, "get_status"))["memories"] == 0
        nursery.cancel_scope.cancel()
    assert not path.exists(), "the bridge removes its socket when it stops"


async def test_socket_is_private_to_this_user(daemon: Daemon) -> None:
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o600


async def test_a_malformed_line_does_not_end_the_session(daemon: Daemon) -> None:
    # The SDK drops a line that is not JSON-RPC (as its stdio transport does); what matters is
    # that the next message on the same connection is still served.
    stream = await trio.open_unix_socket(os.fspath(daemon.socket))
    async with stream:
        ping = {"jsonrpc": "2.0", "id": 7, "method": "ping"}
        await stream.send_all(
            b'this is not json\n{"jsonrpc": 1}\n' + json.dumps(ping).encode() + b"\n"
        )
        buffer = b""
        with trio.fail_after(5):
            while b"\n" not in buffer:
                buffer += await stream.receive_some(65536)
    assert json.loads(buffer.split(b"\n")[0]) == {"jsonrpc": "2.0", "id": 7, "result": {}}


async def test_a_second_bridge_will_not_steal_a_live_socket_but_replaces_a_stale_one(
    daemon: Daemon,
) -> None:
    with pytest.raises(OSError, match="already serving its MCP socket"):
        await McpBridge(daemon.node.service, daemon.socket).run()

    stale = daemon.data_dir / "stale.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(os.fspath(stale))
    leftover.close()  # a crashed daemon leaves the file behind, nobody listening
    bridge = McpBridge(daemon.node.service, stale)
    async with trio.open_nursery() as nursery:
        await nursery.start(bridge.run)
        async with mcp_session(stale) as session:
            assert (await call_ok(session, "get_status"))["memories"] == 0
        nursery.cancel_scope.cancel()


async def test_an_oversized_message_closes_only_that_connection(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("actors.mcp_bridge.MAX_MESSAGE_BYTES", 4096)
    stream = await trio.open_unix_socket(os.fspath(daemon.socket))
    async with stream:
        await stream.send_all(b'{"jsonrpc": "2.0", "method": "' + b"x" * 10_000)
        with trio.fail_after(5):
            assert await stream.receive_some() == b"", "the bridge hangs up"
    async with mcp_session(daemon.socket) as session:
        assert (await call_ok(session, "get_status"))["memories"] == 0


async def test_peer_credentials_identify_this_user() -> None:
    from actors.mcp_bridge import _peer_is_us

    left, right = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        assert _peer_is_us(left)


async def test_sixteen_idle_sessions_give_a_slot_to_the_seventeenth(daemon: Daemon) -> None:
    path = daemon.data_dir / "idle.sock"
    bridge = McpBridge(daemon.node.service, path, evict_idle_after=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(bridge.run)
        idle = [await trio.open_unix_socket(os.fspath(path)) for _ in range(16)]
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert bridge.sessions == 16
        await trio.sleep(0.3)  # the behaviour under test: sixteen sessions now idle > 0.2 s
        async with mcp_session(path) as seventeenth:
            assert (await call_ok(seventeenth, "get_status"))["memories"] == 0
            # The longest-idle session gave up its slot: the bridge closed it.
            with trio.fail_after(5):
                assert await idle[0].receive_some() == b""
            assert bridge.sessions == 16
        for stream in idle:
            await stream.aclose()
        nursery.cancel_scope.cancel()
