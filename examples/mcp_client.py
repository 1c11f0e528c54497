"""Talk to your dmgn memory the way an AI tool does: the official MCP SDK, through `dmgn mcp`.

Run with a daemon started (`dmgn start`):

    python examples/mcp_client.py "build cache"

It stores one memory, searches, and prints the results and the neighbourhood graph of the best hit.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import anyio
from mcp import ClientSession, StdioServerParameters, stdio_client


async def main(question: str) -> None:
    server = StdioServerParameters(command="dmgn", args=["mcp"])
    async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        await call(
            session,
            "add_memory",
            content="We decided to cache build artifacts in CI.",
            type="observation",
            metadata={"project": "atlas"},
        )
        found = await call(session, "query_memory", query=question, limit=5)
        print(json.dumps(found, indent=2))
        if found["results"]:
            graph = await call(session, "get_graph", start_id=found["results"][0]["memory_id"])
            print(json.dumps(graph, indent=2))


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await session.call_tool(tool, arguments)
    if result.is_error or result.structured_content is None:
        raise SystemExit(f"{tool} failed: {result.content}")
    content: dict[str, Any] = result.structured_content
    return content


if __name__ == "__main__":
    anyio.run(main, " ".join(sys.argv[1:]) or "build cache", backend="trio")
