"""add_memories: many memories in one MCP call, each reported; the rest go in when one fails."""

from __future__ import annotations

from tests.mcp.test_mcp_bridge import Daemon, call_error, call_ok, daemon, mcp_session

__all__ = ["daemon"]  # the fixture, imported for pytest


async def test_add_memories_stores_and_indexes_them_all(daemon: Daemon) -> None:
    async with mcp_session(daemon.socket) as session:
        first = await call_ok(session, "add_memory", content="the shared wiki lives on hal9000")
        batch = [{"content": f"imported chat line {i} about sailing boats"} for i in range(40)]
        batch[7] = {"content": "the harbour master is called Ingrid", "type": "observation"}
        batch[9] = {"content": "links back to the wiki note", "links": [first["id"]]}
        batch[11] = {"content": "links to nothing", "links": ["ffffffffffff"]}
        out = await call_ok(session, "add_memories", memories=batch)
        assert out["added"] == 39 and out["already_present"] == 0
        assert [e["index"] for e in out["errors"]] == [11]
        assert "ffffffffffff" in out["errors"][0]["error"]
        assert out["ids"][11] is None and all(out["ids"][i] for i in range(40) if i != 11)
        found = await call_ok(session, "query_memory", query="harbour master", limit=1)
        assert found["results"][0]["memory_id"] == out["ids"][7]
        graph = await call_ok(session, "get_graph", start_id=first["id"])
        assert out["ids"][9] in {n["id"] for n in graph["nodes"]}
        status = await call_ok(session, "get_status")
        assert status["memories"] == 40


async def test_a_malformed_memory_refuses_the_call_and_names_it(daemon: Daemon) -> None:
    async with mcp_session(daemon.socket) as session:
        message = await call_error(
            session, "add_memories", memories=[{"content": "fine"}, {"content": ""}]
        )
        assert "memories" in message and "1" in message
        message = await call_error(session, "add_memories", memories=[])
        assert "memories" in message
        status = await call_ok(session, "get_status")
        assert status["memories"] == 0
