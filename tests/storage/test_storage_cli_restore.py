"""`dmgn import` then `dmgn restore --from-network` as a user runs them: real processes on a
brand-new data dir, talking to storage nodes over WebSocket + Noise on 127.0.0.1."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio

from dmgn.identity import EXPORT_FORMAT, encrypt_seed
from tests._deadlines import scaled
from tests.storage._cluster import cluster, eventually, seed_of

PASSPHRASE = "correct horse battery"


async def dmgn(data_dir: Path, *args: str) -> trio.CompletedProcess[bytes]:
    env = {**os.environ, "DMGN_DATA_DIR": str(data_dir), "DMGN_PASSPHRASE": PASSPHRASE}
    env["DMGN_EMBEDDER"] = "hashing"
    return await trio.run_process(
        [sys.executable, "-m", "dmgn.app.cli", *args],
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_import_then_restore_from_network_rebuilds_everything(tmp_path: Path) -> None:
    async with cluster() as nodes:
        storage = [await nodes.start(f"s{i}", f"stranger{i % 2}") for i in range(6)]
        owner = await nodes.start("owner", "owner")
        ids = {await owner.add(f"note {i} for the new laptop") for i in range(12)}

        async def placed() -> bool:
            d = await owner.durability()
            held = sum([(await m.storage()).mail_items for m in storage])
            return d.complete == len(ids) and held >= 4 * d.mailbox_items

        await eventually(placed)
        await owner.stop()

        export = tmp_path / "identity.export"
        await trio.Path(export).write_bytes(
            encrypt_seed(seed_of("owner"), PASSPHRASE, fmt=EXPORT_FORMAT)
        )
        fresh = tmp_path / "fresh"
        imported = await dmgn(fresh, "import", "-i", str(export))
        assert imported.returncode == 0, imported.stderr.decode()
        config = {
            "listen_addr": "ws://127.0.0.1:0",
            "bootstrap_peers": [m.address for m in storage],
            "mdns": False,
        }
        await trio.Path(fresh / "config.json").write_text(json.dumps(config))
        # --wait (30 s by default) for the six peers, stretched with the load like the
        # suite's own waits: under load a first dial can fail, and storage peers are redialed
        # with a backoff of up to 60 s.
        wait = str(scaled(30))
        done = await dmgn(
            fresh, "restore", "--from-network", "--peers", "6", "--wait", wait, "--json"
        )
        assert done.returncode == 0, done.stderr.decode()
        report = json.loads(done.stdout)
        assert report["memories"] == 12 and report["unrecoverable"] == []
        assert report["storage_peers"] == 6 and report["memories_rebuilt"] == 12
        listed = await dmgn(fresh, "query", "--recent", "--limit", "50", "--json")
        assert {r["id"] for r in json.loads(listed.stdout)["results"]} == ids


async def test_restore_from_network_without_an_identity_says_what_to_do(tmp_path: Path) -> None:
    done = await dmgn(tmp_path / "empty", "restore", "--from-network")
    assert done.returncode != 0
    assert b"dmgn import" in done.stderr
