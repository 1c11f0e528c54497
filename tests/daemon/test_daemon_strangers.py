"""Strangers cannot lock our own device out of a real node (issue 12 items 2-3, bounded).

A smaller version of ``benchmarks/attack_strangers.py``: device A is a real `dmgn-node` with
``max_connections`` 12 (so 9 slots for strangers); 12 idle strangers and 12 strangers that
each start a 16 MiB message they never finish (fresh identities, 3 per 127.0.0.x address,
reconnecting) attack it while our second device B starts. B must be connected and synced
within 5 s of its daemon being ready, ``dmgn status`` on A must answer within 1 s, and A's
RSS must stay far from what the attack once took (1.24 GB).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio

from dmgn import api
from tests._deadlines import scaled

sys.path.insert(0, str(Path(__file__).parents[1] / "sync"))
sys.path.append(str(Path(__file__).parents[2] / "benchmarks"))
from attackers import AttackStats, idle_stranger, partial_stranger
from test_sync_processes import Device

pytestmark = pytest.mark.slow

STRANGERS = 12  # of each kind
PER_ADDRESS = 3


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def test_own_device_connects_and_syncs_while_strangers_attack_a_real_node() -> None:
    root = Path(tempfile.mkdtemp(prefix="dmgn-strangers-"))
    a, b = Device(root, "a"), Device(root, "b")
    try:
        a.run("init")
        a.configure([])
        config = a.root / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "max_connections": 12}))
        backup = root / "identity.backup"
        a.run("export", "-o", str(backup))
        b.run("import", "-i", str(backup))
        b.configure([a.address])
        await trio.to_thread.run_sync(a.start)
        (pid,) = a.pids
        marker = str(await trio.to_thread.run_sync(a.add, "written before the attack"))
        rss: list[float] = []
        idle, partial = AttackStats(), AttackStats()
        async with trio.open_nursery() as nursery:
            for i in range(2 * STRANGERS):
                source = f"127.0.0.{100 + i // PER_ADDRESS}"
                attack = idle_stranger if i < STRANGERS else partial_stranger
                nursery.start_soon(attack, a.address, source, idle if i < STRANGERS else partial)
            # Setting the attack up is not what is measured (B's sync below is): under load
            # the strangers' handshakes take longer, and a fixed 60 s failed here twice.
            with trio.fail_after(scaled(60)):
                while idle.handshakes + partial.handshakes < STRANGERS:
                    rss.append(rss_mb(pid))
                    await trio.sleep(0.2)
            await trio.sleep(3)
            await trio.to_thread.run_sync(b.start)
            ready = time.monotonic()
            with trio.fail_after(5):
                while True:
                    held = await trio.to_thread.run_sync(b.ids)
                    if marker in held:
                        break
                    await trio.sleep(0.05)
            synced_after = time.monotonic() - ready
            for _ in range(3):
                start = time.monotonic()
                await trio.to_thread.run_sync(a.request, api.Status())
                assert time.monotonic() - start < 1.0
                rss.append(rss_mb(pid))
                await trio.sleep(0.5)
            peers = await trio.to_thread.run_sync(a.request, api.Peers())
            nursery.cancel_scope.cancel()
        connected = [p for p in peers["peers"] if p.get("state") == "connected"]
        assert any(p["kind"] == "device" for p in connected)
        assert sum(p["kind"] != "device" for p in connected) <= 9
        assert max(rss) < 400, rss
        assert synced_after < 5
    finally:
        a.kill_all()
        b.kill_all()
        shutil.rmtree(root, ignore_errors=True)
