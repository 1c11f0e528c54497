"""``dmgn mcp`` as a real subprocess: what an AI tool launches, relaying stdio to the daemon's
MCP bridge (running in this test process on a temp data dir)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from mcp import ClientSession, StdioServerParameters, stdio_client

from actors.mcp_bridge import McpBridge
from actors.node import RunningNode, open_node
from dmgn.paths import DataDir

REPO_ROOT = Path(__file__).resolve().parents[2]
RELAY = [sys.executable, "-m", "dmgn.app.mcp_stdio", "--data-dir"]
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"},
    },
}


@pytest.fixture
async def node() -> AsyncIterator[tuple[Path, RunningNode]]:
    data_dir = Path(tempfile.mkdtemp(prefix="dmgn-stdio-", dir="/tmp"))
    try:
        async with open_node(os.urandom(32), os.urandom(16), data_dir) as running:
            yield data_dir, running
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_ai_tool_reaches_the_daemon_through_dmgn_mcp_on_stdio(
    node: tuple[Path, RunningNode],
) -> None:
    data_dir, running = node
    params = StdioServerParameters(
        command=sys.executable, cwd=REPO_ROOT, args=[*RELAY[1:], os.fspath(data_dir)]
    )
    with tempfile.TemporaryFile("w+") as errlog:
        async with trio.open_nursery() as nursery:
            await nursery.start(McpBridge(running.service, DataDir(data_dir).mcp_socket).run)
            async with (
                stdio_client(params, errlog=errlog) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                names = {tool.name for tool in (await session.list_tools()).tools}
                added = await session.call_tool("add_memory", {"content": "relayed through stdio"})
                found = await session.call_tool("query_memory", {"query": "relayed"})
                bad = await session.call_tool("get_context", {"limit": 0})
            nursery.cancel_scope.cancel()
        errlog.seek(0)
        assert errlog.read() == "", "the relay says nothing on a clean session"
    assert len(names) == 12  # the 11 reference tools and add_memories
    assert added.structured_content is not None and not added.is_error
    assert found.structured_content is not None
    assert found.structured_content["results"][0]["memory_id"] == added.structured_content["id"]
    assert bad.is_error


async def test_without_a_daemon_dmgn_mcp_says_so_in_one_line_and_exits_nonzero() -> None:
    with tempfile.TemporaryDirectory(prefix="dmgn-none-", dir="/tmp") as data_dir:
        done = await trio.run_process(
            [*RELAY, data_dir],
            cwd=REPO_ROOT,
            check=False,
            stdin=json.dumps(INITIALIZE).encode() + b"\n",
            capture_stdout=True,
            capture_stderr=True,
        )
    assert done.returncode == 2
    assert done.stdout == b"", "stdout carries protocol only"
    assert done.stderr.decode() == (
        f"dmgn mcp: no dmgn daemon is running for {data_dir}; start it with `dmgn start`\n"
    )


async def test_requests_sent_before_stdin_closes_are_still_answered(
    node: tuple[Path, RunningNode],
) -> None:
    data_dir, running = node
    async with trio.open_nursery() as nursery:
        await nursery.start(McpBridge(running.service, DataDir(data_dir).mcp_socket).run)
        with trio.fail_after(10):
            done = await trio.run_process(
                [*RELAY, os.fspath(data_dir)],
                cwd=REPO_ROOT,
                check=False,
                stdin=json.dumps(INITIALIZE).encode() + b"\n",
                capture_stdout=True,
                capture_stderr=True,
            )
        nursery.cancel_scope.cancel()
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.splitlines()
    assert json.loads(line)["result"]["serverInfo"]["name"] == "dmgn"
    assert done.stderr == b""


async def test_when_the_daemon_stops_dmgn_mcp_says_so_and_exits_nonzero(
    node: tuple[Path, RunningNode],
) -> None:
    data_dir, running = node
    async with trio.open_nursery() as nursery:
        bridge_scope = trio.CancelScope()

        async def bridge(task_status: trio.TaskStatus[None]) -> None:
            with bridge_scope:
                await McpBridge(running.service, DataDir(data_dir).mcp_socket).run(
                    task_status=task_status
                )

        await nursery.start(bridge)
        process = await trio.lowlevel.open_process(
            [*RELAY, os.fspath(data_dir)],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert process.stdin and process.stdout and process.stderr
        with trio.fail_after(10):
            await process.stdin.send_all(json.dumps(INITIALIZE).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                reply += await process.stdout.receive_some()
            assert json.loads(reply)["id"] == 1
            bridge_scope.cancel()  # the daemon stops
            status = await process.wait()
            stderr = await process.stderr.receive_some()
        await process.stdin.aclose()
    assert status == 1
    assert stderr.decode().count("\n") == 1
    assert stderr.startswith(b"dmgn mcp: the dmgn daemon closed the connection")
