"""The offline CLI, run as a user would: real processes, a real data dir on disk."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests._deadlines import scaled

PASSPHRASE = "correct horse battery"


def dmgn(
    data_dir: Path, *args: str, passphrase: str = PASSPHRASE, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DMGN_DATA_DIR": str(data_dir), "DMGN_PASSPHRASE": passphrase}
    env.pop("DMGN_DEBUG", None)
    result = subprocess.run(
        [sys.executable, "-m", "dmgn.app.cli", *args],
        env=env,
        text=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=scaled(60),
    )
    if check and result.returncode != 0:
        raise AssertionError(f"dmgn {' '.join(args)} failed: {result.stderr}")
    return result


def dmgn_json(data_dir: Path, *args: str) -> Any:
    return json.loads(dmgn(data_dir, *args, "--json").stdout)


def snapshot(data_dir: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(data_dir.iterdir())
        if p.is_file()
    }


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "node"
    dmgn(path, "init")
    return path


def test_memories_links_and_graph_survive_restart_in_chronological_order(data_dir: Path) -> None:
    first = dmgn_json(data_dir, "add", "Alice prefers green tea")
    second = dmgn_json(
        data_dir,
        "add",
        "Alice's birthday is 3 May",
        "--type",
        "observation",
        "--link",
        first["id"][:10],
        "--meta",
        "source=chat",
    )
    third = dmgn_json(
        data_dir,
        "add",
        "Bought tea for Alice's birthday",
        "--link",
        second["id"],
        "--link",
        first["id"],
    )
    ids = [first["id"], second["id"], third["id"]]
    assert all(len(i) == 64 for i in ids)

    found = dmgn_json(data_dir, "query", "tea")
    # Both memories that say "tea" rank above the one that does not.
    assert {hit["memory_id"] for hit in found["results"][:2]} == {ids[0], ids[2]}

    # Every command is its own process: this is the "restart".
    recent = dmgn_json(data_dir, "query", "--recent", "--limit", "10")
    assert [hit["memory_id"] for hit in recent["results"]] == ids
    stamps = [hit["timestamp"] for hit in recent["results"]]
    assert stamps == sorted(stamps)

    got = dmgn_json(data_dir, "get", ids[1][:8])
    assert got["id"] == ids[1] and got["content"] == "Alice's birthday is 3 May"
    assert got["metadata"] == {"source": "chat"} and got["type"] == "observation"
    assert {(link["from"], link["to"]) for link in got["links"]} == {
        (ids[1], ids[0]),
        (ids[2], ids[1]),
    }

    graph = dmgn_json(data_dir, "graph", ids[0], "--depth", "2")
    assert graph["root_id"] == ids[0]
    assert {node["id"] for node in graph["nodes"]} == set(ids)
    assert len(graph["edges"]) == 3

    human = dmgn(data_dir, "query", "--recent").stdout
    assert "Alice prefers green tea" in human


def test_delete_is_permanent_and_ids_must_be_unambiguous(data_dir: Path) -> None:
    kept = dmgn_json(data_dir, "add", "keep me")["id"]
    gone = dmgn_json(data_dir, "add", "delete me", "--link", kept)["id"]
    assert dmgn_json(data_dir, "delete", gone[:12])["deleted"] is True
    recent = dmgn_json(data_dir, "query", "--recent")
    assert [hit["memory_id"] for hit in recent["results"]] == [kept]
    missing = dmgn(data_dir, "get", gone, check=False)
    assert missing.returncode != 0 and "was deleted" in missing.stderr
    assert dmgn_json(data_dir, "get", kept)["links"] == []
    short = dmgn(data_dir, "get", "abc", check=False)
    assert short.returncode != 0 and "unique prefix of at least 6" in short.stderr


def test_store_and_vault_hold_no_plaintext(data_dir: Path) -> None:
    secret_words = "the treasure is buried under the old oak in zanzibar"
    dmgn(data_dir, "add", secret_words, "--meta", "hiding=spot-xyzzy")
    for path in data_dir.rglob("*"):
        if path.is_file():
            blob = path.read_bytes()
            assert b"zanzibar" not in blob and b"xyzzy" not in blob, path
            assert PASSPHRASE.encode() not in blob, path
            assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"


def test_wrong_passphrase_fails_clearly_and_changes_nothing(data_dir: Path) -> None:
    dmgn(data_dir, "add", "something")
    before = snapshot(data_dir)
    result = dmgn(data_dir, "add", "more", passphrase="not the passphrase", check=False)
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1 and "wrong passphrase" in result.stderr
    assert snapshot(data_dir) == before


def test_corrupt_vault_fails_clearly_and_changes_nothing(data_dir: Path) -> None:
    vault = data_dir / "identity.vault"
    vault.write_bytes(vault.read_bytes()[:50])
    before = snapshot(data_dir)
    result = dmgn(data_dir, "status", check=False)
    assert result.returncode != 0 and "not a readable dmgn vault" in result.stderr
    assert result.stderr.count("\n") == 1
    assert snapshot(data_dir) == before


def test_init_refuses_to_overwrite_an_identity(data_dir: Path) -> None:
    before = snapshot(data_dir)
    result = dmgn(data_dir, "init", check=False)
    assert result.returncode != 0 and "--force" in result.stderr
    assert snapshot(data_dir) == before


def test_bad_config_value_fails_clearly_and_changes_nothing(data_dir: Path) -> None:
    config = data_dir / "config.json"
    document = json.loads(config.read_text())
    document["sync_interval"] = "often"
    config.write_text(json.dumps(document))
    before = snapshot(data_dir)
    result = dmgn(data_dir, "add", "x", check=False)
    assert result.returncode != 0 and "sync_interval" in result.stderr
    assert "not a duration" in result.stderr
    assert snapshot(data_dir) == before


def test_tampered_memory_is_refused_on_read(data_dir: Path) -> None:
    memory_id = dmgn_json(data_dir, "add", "original words")["id"]
    import duckdb

    db = duckdb.connect(str(data_dir / "memories.duckdb"))
    envelope = bytearray(db.execute("SELECT envelope FROM memories").fetchone()[0])
    envelope[-5] ^= 1
    db.execute("UPDATE memories SET envelope = ?", [bytes(envelope)])
    db.close()
    result = dmgn(data_dir, "get", memory_id, check=False)
    assert result.returncode != 0 and "tampered" in result.stderr


def test_export_import_gives_the_same_identity_elsewhere(data_dir: Path, tmp_path: Path) -> None:
    backup = tmp_path / "backup.key"
    exported = dmgn_json(data_dir, "export", "-o", str(backup))
    assert backup.stat().st_mode & 0o777 == 0o600
    other = tmp_path / "laptop"
    imported = dmgn_json(other, "import", "-i", str(backup))
    assert imported["identity_id"] == exported["identity_id"]
    assert imported["device_id"] != dmgn_json(data_dir, "status")["device_id"]


def test_passwd_changes_the_passphrase(data_dir: Path, tmp_path: Path) -> None:
    new = tmp_path / "new-pass"
    new.write_text("a brand new passphrase\n")
    dmgn(data_dir, "passwd", "--new-passphrase-file", str(new))
    assert dmgn(data_dir, "status", check=False).returncode != 0
    status = dmgn(data_dir, "status", "--json", passphrase="a brand new passphrase")
    assert json.loads(status.stdout)["memories"] == 0


_WRITER = textwrap.dedent("""
    import sys, trio
    from dmgn import api
    from dmgn.identity import decrypt_seed, load_or_create_device_id
    from dmgn.paths import DataDir
    from actors.node import open_node

    dd = DataDir(__import__("pathlib").Path(sys.argv[1]))
    seed = decrypt_seed(dd.vault.read_bytes(), sys.argv[2], source=dd.vault)
    device = load_or_create_device_id(dd.device)

    async def writer(node, worker):
        for i in range(100000):
            r = await node.request(api.AddMemory(content=f"memory {worker}-{i}"))
            print("ACK", r["id"], flush=True)

    async def main():
        async with open_node(seed, device, dd.root) as node:
            async with trio.open_nursery() as n:
                for worker in range(4):
                    n.start_soon(writer, node, worker)

    trio.run(main)
""")


def test_acknowledged_adds_survive_kill_9(data_dir: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(data_dir), PASSPHRASE],
        stdout=subprocess.PIPE,
        text=True,
    )
    acknowledged: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        acknowledged.append(line.split()[1])
        if len(acknowledged) >= 150:
            break
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    acknowledged += [line.split()[1] for line in process.stdout if line.startswith("ACK")]
    recent = dmgn_json(data_dir, "query", "--recent", "--limit", "1000")
    stored = {hit["memory_id"] for hit in recent["results"]}
    assert set(acknowledged) <= stored
