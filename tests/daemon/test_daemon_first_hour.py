"""A new user's first hour through a running daemon (issue 13), on every path: the `dmgn` CLI
offline, the CLI through the daemon, and an AI tool through `dmgn mcp` (the MCP SDK's own stdio
client, and examples/mcp_client.py).

What a memory may contain reads the same everywhere: a memory is text - valid Unicode, no NUL
bytes or other control characters but whitespace, at most 1 MiB of UTF-8; input in another
encoding is an error naming the byte (or is decoded with ``--encoding``), never an "internal
error". Every time in ns comes with its RFC 3339 string beside it.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client

from dmgn.app.daemon import is_dmgn_node, pid_alive
from dmgn.memory import MAX_CONTENT_BYTES
from tests._deadlines import scaled

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PASSPHRASE = "content-rules-passphrase"
TOO_BIG = "x" * (2 * 1024 * 1024)
TOO_BIG_MESSAGE = (
    f"content is {len(TOO_BIG)} bytes of UTF-8; the limit is {MAX_CONTENT_BYTES} bytes (1 MiB) "
    "- split long documents into several memories"
)
NUL_MESSAGE = "content contains the control character U+0000 at character 0"
LATIN1 = "Café crème, naïve façade\n".encode("latin-1")


class Dmgn:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {
            **os.environ,
            "DMGN_DATA_DIR": str(root),
            "DMGN_PASSPHRASE": PASSPHRASE,
            "DMGN_EMBEDDER": "hashing",
        }
        self.env.pop("DMGN_DEBUG", None)

    def run(self, *args: str | bytes, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "dmgn.app.cli", *args],
            env=self.env,
            input=stdin,
            capture_output=True,
            timeout=scaled(120),
        )
        return subprocess.CompletedProcess(
            done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
        )

    def ok(self, *args: str) -> Any:
        done = self.run(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def kill(self) -> None:
        pid_file = self.root / "dmgn-node.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text())
            if pid_alive(pid) and is_dmgn_node(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def node() -> Iterator[Dmgn]:
    root = Path(tempfile.mkdtemp(prefix="dmgn-content-"))  # short: socket paths are limited
    node = Dmgn(root / "data")
    assert node.run("init").returncode == 0
    config = node.root / "config.json"
    document = json.loads(config.read_text())
    document.update(listen_addr="ws://127.0.0.1:0", mdns=False)
    config.write_text(json.dumps(document))
    try:
        yield node
    finally:
        node.kill()
        shutil.rmtree(root, ignore_errors=True)


def refusals(node: Dmgn) -> dict[str, subprocess.CompletedProcess[str]]:
    return {
        "too big": node.run("add", "-", stdin=TOO_BIG.encode()),
        "latin-1 on stdin": node.run("add", "-", stdin=LATIN1),
        "binary on stdin": node.run("add", "-", stdin=bytes(range(256)) * 4),
        "NUL bytes": node.run("add", "-", stdin=bytes(100)),
        "latin-1 argument": node.run(b"add", b"caf\xe9"),
    }


def check_refusals(found: dict[str, subprocess.CompletedProcess[str]]) -> None:
    for what, done in found.items():
        assert done.returncode == 2, (what, done.stderr)
        assert done.stderr.startswith("dmgn: ") and done.stderr.count("\n") == 1, (what, done)
        assert "internal error" not in done.stderr and "Traceback" not in done.stderr
    assert found["too big"].stderr == f"dmgn: {TOO_BIG_MESSAGE}\n"
    assert found["latin-1 on stdin"].stderr.startswith(
        "dmgn: stdin is not utf-8 text: byte 0xe9 at offset 3 cannot be decoded"
    )
    assert "--encoding latin-1" in found["latin-1 on stdin"].stderr
    assert "a binary file cannot be a memory" in found["binary on stdin"].stderr
    assert found["NUL bytes"].stderr.startswith(f"dmgn: {NUL_MESSAGE}")
    assert found["latin-1 argument"].stderr.startswith(
        "dmgn: TEXT is not UTF-8 (byte 0xe9 at character 3)"
    )


async def mcp_add(node: Dmgn, contents: list[str]) -> list[tuple[bool, str]]:
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "dmgn.app.cli", "mcp", "--data-dir", str(node.root)],
        cwd=REPO,
    )
    answers = []
    with tempfile.TemporaryFile("w+") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            for content in contents:
                result = await session.call_tool("add_memory", {"content": content})
                text = result.content[0].text if result.content else ""  # type: ignore[union-attr]
                answers.append((result.is_error, text))
    return answers


async def test_content_rules_and_the_size_limit_read_the_same_on_every_path(node: Dmgn) -> None:
    offline = refusals(node)
    check_refusals(offline)
    assert node.ok("status")["memories"] == 0, "nothing refused was stored"

    start = node.run("start", "--json")
    assert start.returncode == 0, start.stderr
    online = refusals(node)
    check_refusals(online)
    assert {k: v.stderr for k, v in online.items()} == {k: v.stderr for k, v in offline.items()}

    accepted = node.run("add", "-", "--encoding", "latin-1", "--json", stdin=LATIN1)
    assert accepted.returncode == 0, accepted.stderr
    memory = node.ok("get", json.loads(accepted.stdout)["id"])
    assert memory["content"] == LATIN1.decode("latin-1")

    answers = await mcp_add(node, [TOO_BIG, "\x00" * 100, "tabs\tand\nnewlines are text"])
    # The MCP SDK frames every tool error as "Error executing tool NAME: MESSAGE".
    framing = "Error executing tool add_memory: "
    assert answers[0] == (True, framing + TOO_BIG_MESSAGE)
    assert answers[1][0] and answers[1][1].startswith(framing + NUL_MESSAGE)
    assert answers[2][0] is False
    assert node.ok("status")["memories"] == 2
    assert node.run("stop").returncode == 0


def _documents(text: str) -> list[Any]:
    decoder, found, at = json.JSONDecoder(), [], 0
    while at < len(text):
        if text[at].isspace():
            at += 1
            continue
        document, at = decoder.raw_decode(text, at)
        found.append(document)
    return found


def _same_instant(ns: int, text: str) -> bool:
    moment = datetime.datetime.fromisoformat(text[:19]).replace(tzinfo=datetime.UTC)
    return text.endswith("Z") and int(moment.timestamp()) * 10**9 + int(text[20:29]) == ns


def example(node: Dmgn, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in node.env.items() if k != "DMGN_DATA_DIR"}
    return subprocess.run(
        [sys.executable, str(REPO / "examples" / "mcp_client.py"), *args],
        env=env,
        cwd=node.root.parent,
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )


async def test_mcp_example_and_tools_with_a_non_default_data_dir_and_rfc3339_times(
    node: Dmgn,
) -> None:
    # No daemon yet: the example shows `dmgn mcp`'s own line, not an exception group.
    refused = example(node, "--data-dir", str(node.root), "build cache")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"dmgn mcp: no dmgn daemon is running for {node.root}; start it with `dmgn start`"
    ]

    started = node.ok("start")
    assert started["started_at_rfc3339"].endswith("Z")
    first = node.ok("add", "the first of three")
    assert _same_instant(first["timestamp"], first["timestamp_rfc3339"])
    second = node.ok("add", "the second of three", "--link", first["id"])
    assert node.ok("status")["started_at"].endswith("Z")

    ran = example(node, "--data-dir", str(node.root), "build cache")
    assert ran.returncode == 0, ran.stderr
    found, graph = _documents(ran.stdout)
    hit = found["results"][0]
    assert "build artifacts" in hit["snippet"]
    assert _same_instant(hit["timestamp"], hit["timestamp_rfc3339"])
    assert all(_same_instant(n["timestamp"], n["timestamp_rfc3339"]) for n in graph["nodes"])

    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "dmgn.app.cli", "mcp", "--data-dir", str(node.root)],
        cwd=REPO,
    )
    with tempfile.TemporaryFile("w+") as errlog:
        async with (
            stdio_client(params, errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            recent = await session.call_tool("query_memory", {"recent": True, "limit": 2})
            around = await session.call_tool("get_graph", {"start_id": first["id"]})
            context = await session.call_tool("get_context", {"limit": 3})
    assert recent.structured_content is not None and not recent.is_error
    rows = recent.structured_content["results"]
    assert [r["memory_id"] for r in rows] == [second["id"], rows[1]["memory_id"]]
    assert all("score" not in r for r in rows)
    assert all(_same_instant(r["timestamp"], r["timestamp_rfc3339"]) for r in rows)
    assert around.structured_content is not None
    (edge,) = around.structured_content["edges"]
    assert _same_instant(edge["created"], edge["created_rfc3339"])
    assert context.structured_content is not None
    for memory in context.structured_content["memories"]:
        assert _same_instant(memory["timestamp"], memory["timestamp_rfc3339"])
    assert node.run("stop").returncode == 0
