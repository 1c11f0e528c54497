"""Talk to your dmgn memory the way an AI tool does: the official MCP SDK, through `dmgn mcp`.

Run with a daemon started (`dmgn start`):

    python examples/mcp_client.py "build cache"
    python examples/mcp_client.py --data-dir /path/to/data "build cache"

It stores one memory, searches, and prints the results and the neighbourhood graph of the best
hit. The SDK starts `dmgn mcp` with a minimal environment (``DMGN_DATA_DIR`` is not passed on),
so a non-default data dir is given to it as ``--data-dir`` (this script's ``--data-dir``, or
``DMGN_DATA_DIR`` if set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any, TextIO

import anyio
from mcp import ClientSession, StdioServerParameters, stdio_client


async def main(question: str, data_dir: str | None, errlog: TextIO = sys.stderr) -> None:
    # This interpreter runs `dmgn mcp`, so the script works from the venv without activating it.
    args = ["-m", "dmgn.app.cli", "mcp", *(["--data-dir", data_dir] if data_dir else [])]
    server = StdioServerParameters(command=sys.executable, args=args)
    async with (
        stdio_client(server, errlog=errlog) as (read, write),
        ClientSession(read, write) as session,
    ):
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


def run() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="*", help="what to search for (default: build cache)")
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("DMGN_DATA_DIR"),
        help="the daemon's data dir, if not the default (env DMGN_DATA_DIR)",
    )
    options = parser.parse_args()
    # `dmgn mcp` says in one line why it cannot serve (no daemon, another user's...); keep that
    # line and show it instead of the SDK's long exception group around a closed pipe.
    with tempfile.TemporaryFile("w+") as errors:
        try:
            question = " ".join(options.question) or "build cache"
            anyio.run(main, question, options.data_dir, errors, backend="trio")
        except Exception as failure:  # the SDK's task group wraps whatever went wrong
            errors.seek(0)
            said = errors.read().strip()
            print(said or f"error: {_innermost(failure)}", file=sys.stderr)
            return 1
        errors.seek(0)
        sys.stderr.write(errors.read())
    return 0


def _innermost(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


if __name__ == "__main__":
    sys.exit(run())
