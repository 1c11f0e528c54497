"""What a new user meets in the first hour with the CLI (issue 13): the real `dmgn` process
against a real data dir, offline, at the width of a plain 80-column terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests._deadlines import scaled

PASSPHRASE = "first hour passphrase"


def dmgn(
    data_dir: Path, *args: str, stdin: bytes = b"", columns: int = 80
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DMGN_DATA_DIR": str(data_dir),
        "DMGN_PASSPHRASE": PASSPHRASE,
        "DMGN_EMBEDDER": "hashing",
        "COLUMNS": str(columns),
    }
    env.pop("DMGN_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-m", "dmgn.app.cli", *args],
        env=env,
        input=stdin,
        capture_output=True,
        timeout=scaled(120),
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def ok(data_dir: Path, *args: str, stdin: bytes = b"") -> str:
    done = dmgn(data_dir, *args, stdin=stdin)
    assert done.returncode == 0, done.stderr
    return done.stdout


def ok_json(data_dir: Path, *args: str) -> Any:
    return json.loads(ok(data_dir, *args, "--json"))


# One data dir for the module: the tests below only read it (query, graph), and building it
# is seven CLI processes.
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("first-hour") / "node"
    ok(path, "init")
    return path


@pytest.fixture(scope="module")
def linked(data_dir: Path) -> dict[str, str]:
    """A ← B, A ← C, B ← D, and C caused_by B; E stands apart."""
    ids = {"A": ok_json(data_dir, "add", "Alice plans a trip to Lisbon")["id"]}
    ids["B"] = ok_json(data_dir, "add", "Alice booked the flight", "--link", ids["A"])["id"]
    ids["C"] = ok_json(data_dir, "add", "Alice took a week off", "--link", ids["A"])["id"]
    ids["D"] = ok_json(data_dir, "add", "The flight leaves at 7", "--link", ids["B"])["id"]
    ids["E"] = ok_json(data_dir, "add", "Bob likes chess")["id"]
    ok(data_dir, "link", ids["C"], ids["B"], "--type", "caused_by")
    return ids


def test_recent_links_of_lists_only_the_linked_memories(
    data_dir: Path, linked: dict[str, str]
) -> None:
    recent = ok_json(data_dir, "query", "--recent", "--links-of", linked["A"][:10])
    assert [h["id"] for h in recent["results"]] == [linked["B"], linked["C"]]  # oldest first
    # --links-of alone means the same, instead of being refused.
    alone = ok_json(data_dir, "query", "--links-of", linked["A"][:10])
    assert [h["id"] for h in alone["results"]] == [linked["B"], linked["C"]]
    newest = ok_json(data_dir, "query", "--recent", "--links-of", linked["B"], "--limit", "2")
    assert [h["id"] for h in newest["results"]] == [linked["C"], linked["D"]]


def test_graph_draws_every_edge_it_counts(data_dir: Path, linked: dict[str, str]) -> None:
    out = ok(data_dir, "graph", linked["A"])
    assert "4 nodes, 4 edges (depth 2)" in out
    edge_lines = [line for line in out.splitlines() if "related" in line or "caused_by" in line]
    assert len(edge_lines) == 4, out
    assert any("caused_by" in line for line in edge_lines), out
    assert linked["E"][:12] not in out
    single = ok(data_dir, "graph", linked["E"])
    assert "1 node, 0 edges" in single


def test_counts_are_singular_for_one_and_recent_rows_have_no_score(
    data_dir: Path, linked: dict[str, str]
) -> None:
    out = ok(data_dir, "query", "chess")
    assert "Found 1 memory:" in out and "Score: " in out
    recent = ok(data_dir, "query", "--recent", "--limit", "3")
    assert "Found 3 memories:" in recent
    assert "Score" not in recent
    assert all("score" not in h for h in ok_json(data_dir, "query", "--recent")["results"])
    one_link = ok(data_dir, "graph", linked["D"], "--depth", "1")
    assert "2 nodes, 1 edge (depth 1)" in one_link


def test_stop_on_a_missing_data_dir_does_not_create_it(tmp_path: Path) -> None:
    missing = tmp_path / "never-made"
    done = dmgn(missing, "stop")
    assert done.returncode == 0, done.stderr
    assert "not running" in done.stdout
    assert not missing.exists()
