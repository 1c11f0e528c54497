"""A command that goes through the daemon loads no numpy, faiss, DuckDB or model code, and an
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


def imported_by(node: Node, tmp: Path, *args: str) -> tuple[set[str], str]:
    listing = tmp / "modules.txt"
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(listing), *args],
        env=node.env,
        capture_output=True,
        text=True,
        timeout=120,
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
