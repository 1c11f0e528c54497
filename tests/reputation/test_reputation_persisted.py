"""A node's peer scores are kept in its data dir across restarts and shown in `dmgn peers`."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from actors.node import NetworkSettings, open_node, start_networking
from dmgn import api
from dmgn.embedding import HashingEmbedder
from dmgn.reputation import Reputation
from wire import MemoryNetwork

SEED = bytes(range(32))


async def test_scores_are_shown_in_peers_and_saved_in_the_data_dir(tmp_path: Path) -> None:
    network = MemoryNetwork()
    device_b = os.urandom(16)
    async with (
        open_node(SEED, os.urandom(16), tmp_path, embedder=HashingEmbedder()) as a,
        open_node(SEED, device_b, None, embedder=HashingEmbedder()) as b,
    ):
        for node, name, peers, where in ((a, "a", (), tmp_path), (b, "b", ("mem://a",), None)):
            settings = NetworkSettings(
                listen_addr=f"mem://{name}", bootstrap=peers, discovery=False, redial_interval=0.5
            )
            await start_networking(node, network, settings, where)
        with trio.fail_after(20):
            while True:
                rows = (await a.request(api.Peers()))["peers"]
                shown = [r for r in rows if r["device_id"] == device_b.hex()]
                if shown and shown[0]["reputation"] and shown[0]["reputation"]["sync_ok"] >= 1:
                    break
                await trio.sleep(0.05)
        assert shown[0]["reputation"]["score"] > 50
    saved, problem = Reputation.load(tmp_path / "peers" / "reputation.json")
    assert problem is None
    assert saved.rows()[device_b.hex()]["sync_ok"] >= 1
