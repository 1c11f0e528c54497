"""A command that goes through the daemon loads no numpy, faiss, DuckDB or model code; `status`
(and peers, get, query --json) through the daemon not even click, pydantic or rich, by the
console script and by ``python -m dmgn.app.cli``, printing what the click CLI prints; and an
offline read-only command does not load the model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._deadlines import scaled
from tests.daemon.test_daemon_process import Node

pytestmark = pytest.mark.slow

#: Modules a command answered by the daemon must not import (each costs 0.1-1 s of start-up).
HEAVY = (
    "numpy",
    "faiss",
    "duckdb",
    "onnx",
    "onnxruntime",
    "tokenizers",
    "safetensors",
    "threadpoolctl",
    "trio",
    "actors",
    "mcp",
)

#: Runs the CLI like `dmgn`, then writes the names of every imported module to a file.
PROBE = """
import atexit, runpy, sys
listing = sys.argv[1]
def dump():
    with open(listing, "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
atexit.register(dump)
sys.argv = ["dmgn", *sys.argv[2:]]
runpy.run_module("dmgn.app.cli", run_name="__main__")
"""

#: The same, by the console script's entry point (pyproject: dmgn = dmgn.app.daemon_cli:main).
SCRIPT_PROBE = PROBE.replace(
    'runpy.run_module("dmgn.app.cli", run_name="__main__")',
    "from dmgn.app.daemon_cli import main\nmain()",
)

#: The click CLI itself, never the daemon fast path: what the answers must equal.
CLICK = "import sys; sys.argv[0] = 'dmgn'; from dmgn.app.cli import main; main()"

#: What `status` through the daemon must not import either (tens of ms of start-up each).
STARTUP_HEAVY = ("pydantic", "pydantic_core", "click", "rich", "numpy")


def imported_by(node: Node, tmp: Path, *args: str, probe: str = PROBE) -> tuple[set[str], str]:
    listing = tmp / "modules.txt"
    done = subprocess.run(
        [sys.executable, "-c", probe, str(listing), *args],
        env=node.env,
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )
    assert done.returncode == 0, done.stderr
    return set(listing.read_text().split()), done.stdout


def heavy_among(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in HEAVY}


@pytest.fixture
def node() -> Iterator[Node]:
    root = Path(tempfile.mkdtemp(prefix="dmgn-"))
    node = Node(root / "data")
    node.run("init")
    config = node.root / "config.json"
    document = json.loads(config.read_text())
    document.update(listen_addr="ws://127.0.0.1:0", mdns=False)
    config.write_text(json.dumps(document))
    try:
        yield node
    finally:
        node.kill_all()
        shutil.rmtree(root, ignore_errors=True)


def test_commands_through_the_daemon_import_no_heavy_modules(node: Node, tmp_path: Path) -> None:
    node.env["DMGN_EMBEDDER"] = "hashing"
    node.start()
    added = node.json("add", "the daemon answers this")
    for args in (
        ("status", "--json"),
        ("status",),
        ("query", "daemon", "--json"),
        ("get", added["id"]),
        ("add", "another one", "--json"),
    ):
        modules, out = imported_by(node, tmp_path, *args)
        assert out.strip(), args
        assert not heavy_among(modules), (args, sorted(heavy_among(modules)))
    modules, _ = imported_by(node, tmp_path, "status", "--json")
    assert "rich" not in {m.split(".")[0] for m in modules}  # JSON output needs no rich


def test_offline_read_only_commands_do_not_load_the_model(node: Node, tmp_path: Path) -> None:
    node.env.pop("DMGN_EMBEDDER", None)  # the model, as a user has it
    added = node.json("add", "my sister adopted a beagle")  # loads the model: it embeds
    for args in (("status", "--json"), ("get", added["id"], "--json"), ("query", "--recent")):
        modules, out = imported_by(node, tmp_path, *args)
        assert out.strip(), args
        assert "onnxruntime" not in modules and "tokenizers" not in modules, args
    _, out = imported_by(node, tmp_path, "status", "--json")
    shown = json.loads(out)
    assert shown["index"]["embedder"] == "all-MiniLM-L6-v2" and shown["index"]["memories"] == 1
    assert shown["index"]["backend"].startswith("not loaded")


def tops(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def click_cli(node: Node, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", CLICK, *args],
        env=node.env,
        capture_output=True,
        text=True,
        timeout=scaled(120),
    )


def test_status_through_the_daemon_imports_no_pydantic_click_or_rich(
    node: Node, tmp_path: Path
) -> None:
    node.env["DMGN_EMBEDDER"] = "hashing"
    node.start()
    added = node.json("add", "a beagle named Toast")
    for probe in (PROBE, SCRIPT_PROBE):
        for args in (("status", "--json"), ("status",)):
            modules, out = imported_by(node, tmp_path, *args, probe=probe)
            assert "identity_id" in out, (args, out)
            assert not tops(modules) & set(STARTUP_HEAVY), (args, tops(modules) & {*STARTUP_HEAVY})
        # The other read-only commands skip click and pydantic too (rich only for people).
        for args in (
            ("peers", "--json"),
            ("get", added["id"][:10], "--json"),
            ("query", "beagle", "--limit", "3", "--type", "text", "--json"),
        ):
            modules, out = imported_by(node, tmp_path, *args, probe=probe)
            assert out.strip(), args
            assert not tops(modules) & set(STARTUP_HEAVY), (args, tops(modules) & {*STARTUP_HEAVY})
    # A command line the fast path does not know still works, through click.
    modules, out = imported_by(node, tmp_path, "status", "--help", probe=SCRIPT_PROBE)
    assert "Show identity, store" in out and "click" in tops(modules)


def test_answers_through_the_daemon_equal_the_click_clis(node: Node, tmp_path: Path) -> None:
    node.env["DMGN_EMBEDDER"] = "hashing"
    node.start()
    added = node.json("add", "a beagle named Toast", "--meta", "who=sister")
    for args in (
        ("get", added["id"], "--json"),
        ("get", added["id"]),
        ("query", "beagle", "--json"),
        ("query", "--recent", "--full", "--json"),
        ("query", "beagle"),
        # errors: the daemon's validation says what the in-process one says, same exit code
        ("get", "ffffffffffff"),
        ("get", "ffffffffffff", "--json"),
        ("query",),
        ("query", "beagle", "--limit", "0", "--json"),
        ("query", "beagle", "--alpha", "2"),
        ("query", "beagle", "--after", "yesterday"),
        # left to click (same message, exit 2)
        ("query", "beagle", "--limit", "many"),
        ("query", "beagle", "--type", "poem"),
        ("status", "extra"),
    ):
        fast = node.run(*args, ok=False)
        slow = click_cli(node, *args)
        assert (
            fast.returncode,
            fast.stdout,
            fast.stderr.replace("python -m dmgn.app.cli", "dmgn"),
        ) == (
            slow.returncode,
            slow.stdout,
            slow.stderr,
        ), args
    # peers and status carry times ("last_publish_s_ago"): the same shape, not the same bytes
    fast_peers = json.loads(node.run("peers", "--json").stdout)
    assert fast_peers.keys() == json.loads(click_cli(node, "peers", "--json").stdout).keys()
    assert node.run("peers").stdout.startswith("No peers")
    fast_status = json.loads(node.run("status", "--json").stdout)
    slow_status = json.loads(click_cli(node, "status", "--json").stdout)
    assert set(fast_status) == set(slow_status) and fast_status["mode"] == "daemon"
    assert fast_status["identity_id"] == slow_status["identity_id"]
    people = node.run("status").stdout
    assert people.startswith("identity_id") and "\nindex\n  memories" in people
    assert people.splitlines()[0].split() == ["identity_id", fast_status["identity_id"]]


def test_without_a_daemon_the_same_command_lines_work_offline(node: Node) -> None:
    node.env["DMGN_EMBEDDER"] = "hashing"
    shown = node.json("status")
    assert shown["mode"] == "offline"
    assert node.run("status").stdout.startswith("identity_id")
    assert node.json("query", "--recent")["results"] == []
