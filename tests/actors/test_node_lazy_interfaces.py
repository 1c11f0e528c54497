"""The supervision tree loads the daemon's local interfaces only when it starts them: an offline
`dmgn add` or `dmgn status` builds the tree but serves no MCP or REST, and importing the MCP SDK
(hundreds of pydantic models) and hypercorn was most of such a command's start-up."""

from __future__ import annotations

import subprocess
import sys


def test_importing_the_tree_loads_neither_the_mcp_sdk_nor_hypercorn() -> None:
    probe = (
        "import sys, actors.node; "
        "print(' '.join(sorted(m for m in sys.modules "
        "if m.split('.')[0] in {'mcp', 'mcp_types', 'hypercorn'} "
        "or m in {'actors.mcp_bridge', 'actors.rest'})))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    assert loaded == []
