"""Every kind of node starts again from its data dir, holding every kind of data (issue 30).

A node that stored one shard for another identity could not start again (exit 70: the storage
service built its rate buckets in a worker thread, and they read Trio's clock). No test had
restarted a node that holds anything. This one does, with real `dmgn-node` processes started
by `dmgn start` on 127.0.0.1 (mDNS off, the DHT on):

- **s1**, **s2**: nodes of two other identities, each with a memory of its own; they hold
  shards and mailbox items for others (every node offers storage by default).
- **a**: a device of identity A that also stores for others (s1's shards and mailbox items).
- **a2**: A's second device, with ``storage_quota`` 0: a device only. It finds a through the
  DHT (its bootstrap addresses are s1 and s2).

One bootstrap address each, in a ring (s1 → a → s2 → s1), so each node has as storage peer the
one it dialed. With no storage-peer discovery yet a node has at most two storage peers, fewer
than k = 3: A's adds cannot be rebuilt from shards here (the sims' ``restart_storage`` fault
checks that), so a2 is synced with them first, and what it must pull from the mailbox is
whole: a link and a deletion.

- s1, restarted by stop + start: its own memory and placements; s2's shards and mailbox
  items, and A's shards (a2 placed them while it ran).
- s2, restarted by kill -9 + start: its own memory and placements; A's shards and mailbox
  items.
- a, restarted by stop + start, then kill -9 + start: memories, a link, a tombstone,
  placements, s1's shards and mailbox items, reputation records, the REST token.
- a2, restarted by stop + start (it then pulls from s2's mailbox), then kill -9 + start: A's
  memories, link and tombstone.

After each restart ``dmgn start`` exits 0, what the node held is there (the same bytes and
owners held for others, memories, link, tombstone, placements), and it is served: the REST
token answers, reputation records keep the uptime earned before, peers reconnect, a2 pulls
the link and deletion from the restarted s2 while a is off, and a2 and a find each other
through the restarted nodes' DHT.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from dmgn import api
from tests.daemon.test_daemon_process import wait_gone
from tests.sync.test_sync_processes import Device, free_port, wait_for

pytestmark = pytest.mark.slow

#: Restarts, reconnections and a mailbox pull each take a few seconds; polls give up after this.
DEADLINE = 40.0
#: Polls (0.1 s apart) that must see the same holdings before they count as settled.
SETTLED_POLLS = 10


class Node(Device):
    """A data dir driven by the real `dmgn` CLI (see tests/sync/test_sync_processes.py), with
    the restarts under test."""

    def __init__(self, root: Path, name: str) -> None:
        super().__init__(root, name)
        self.api_urls: list[str] = []

    def start(self) -> None:
        facts = self.run("start")  # asserts that `dmgn start` exited 0
        self.pids.add(int(facts["pid"]))
        self.api_urls = list(facts["api_urls"])

    def settings(self, **fields: Any) -> None:
        path = self.root / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))

    def status(self) -> dict[str, Any]:
        return self.request(api.Status())

    def restart(self, how: str) -> None:
        """``stop``: `dmgn stop`, then `dmgn start`. ``kill``: SIGKILL, then `dmgn start`."""
        pid = int((self.root / "dmgn-node.pid").read_text())
        if how == "stop":
            self.stop()
        else:
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        self.start()

    def storage_held(self) -> tuple[int, int]:
        held = self.status()["storage"]
        return held["bytes_held"], held["identities"]

    def durability(self) -> dict[str, Any]:
        return dict(self.status()["durability"])

    def storage_reputation(self) -> dict[str, dict[str, Any]]:
        """The reputation record of each storage peer connected (either way)."""
        rows = self.request(api.Peers())["peers"]
        return {
            r["device_id"]: r["reputation"]
            for r in rows
            if r["kind"] in ("storage", "client") and r["state"] == "connected"
        }


@pytest.fixture
def nodes() -> Iterator[dict[str, Node]]:
    root = Path(tempfile.mkdtemp(prefix="dmgn-rs-"))  # short: Unix socket paths are limited
    made = {name: Node(root, name) for name in ("s1", "s2", "a", "a2")}
    try:
        yield made
    finally:
        for node in made.values():
            node.kill_all()
        for node in made.values():
            for pid in node.pids:
                wait_gone(pid)


def parallel(*jobs: Any) -> None:
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()


def settled(nodes: tuple[Node, ...]) -> dict[str, tuple[int, int]]:
    """What each node holds for others, once it stopped changing (shards are placed, mailbox
    items pushed and a deletion's shards forgotten in the background, after the writes)."""
    last: dict[str, tuple[int, int]] = {}
    same = 0

    def steady() -> bool:
        nonlocal last, same
        now = {n.name: n.storage_held() for n in nodes}
        same = same + 1 if now == last else 0
        last = now
        return same >= SETTLED_POLLS

    wait_for("what the storage nodes hold stops changing", steady, DEADLINE)
    return last


def test_every_kind_of_node_restarts_holding_every_kind_of_data(nodes: dict[str, Node]) -> None:
    s1, s2, a, a2 = (nodes[n] for n in ("s1", "s2", "a", "a2"))
    backup = a.root.parent / "a.identity"
    parallel(*(lambda n=n: n.run("init") for n in (s1, s2, a)))
    a.run("export", "-o", str(backup))
    a2.run("import", "-i", str(backup))
    # One bootstrap address each, in a ring (s1 → a → s2 → s1): a node keeps as its storage
    # peers only those it dialed, so each holds shards and mailbox items for the one before it.
    s1.configure([a.address])
    a.configure([s2.address])
    s2.configure([s1.address])
    a2.configure([s1.address, s2.address])  # finds a through the DHT
    # A fixed ring: this test checks what each node holds across restarts, exactly, so no
    # storage peer may be found meanwhile (peer exchange has its own tests).
    for node in (s1, s2, a, a2):
        node.settings(peer_exchange=False)
    a.settings(api_port=free_port())
    a2.settings(storage_quota=0)
    # In the order the DHT needs: each node's DHT bootstrap answers when it starts (a node
    # whose DHT bootstrap failed publishes again after 10 s and looks up after a minute).
    for node in (s1, s2, a, a2):
        node.start()

    # -- data of every kind --------------------------------------------------------------------
    m1, m2, m3, m4 = (a.add(f"note {i}: the heron at the weir") for i in range(1, 5))
    ours = {s.name: s.add(f"{s.name}'s own note") for s in (s1, s2)}
    token = a.run("token", "show")["token"]
    wait_for("a2 finds a through the DHT and syncs", lambda: a2.ids() == {m1, m2, m3, m4})
    a2.stop()
    # Made while a2 is away: a2 will have them only from s2's mailbox (links and deletions
    # travel whole there; adds are thin, and their k = 3 shards need more storage peers than
    # one bootstrap address and no storage-peer discovery give).
    a.run("link", m1, m2, "--type", "seen-with")
    a.run("delete", m3)
    mine = {m1, m2, m4}
    wait_for(
        "each node's memories placed on the next storage node",
        lambda: [n.durability()["memories_placed"] for n in (a, s1, s2)] == [3, 1, 1],
        DEADLINE,
    )
    held = settled((s1, s2, a))
    # s1 holds s2's and A's (a2 placed A's memories on its two bootstrap peers while it ran)
    assert [held[n][1] for n in ("s1", "s2", "a")] == [2, 1, 1], held

    # -- storage nodes: `dmgn stop` + start and kill -9 + start --------------------------------
    parallel(lambda: s1.restart("stop"), lambda: s2.restart("kill"))
    assert s1.storage_held() == held["s1"] and s2.storage_held() == held["s2"]
    for s in (s1, s2):
        assert s.ids() == {ours[s.name]}
        assert s.durability()["memories_placed"] == 1  # its own placements (keeper's table)
    wait_for(
        "a and s1 reconnect to the restarted storage node they chose",
        lambda: [n.durability()["storage_peers"] for n in (a, s1)] == [1, 1],
        DEADLINE,
    )

    # -- a device that is a storage node too: stop + start, then kill -9 + start ---------------
    reputation = a.storage_reputation()
    assert len(reputation) == 2 and all(reputation.values())  # s1 dialed a, a dialed s2
    a.restart("stop")
    check_device_and_storage(a, mine, m1, m2, held["a"], token)
    wait_for(
        "a and its storage peers reconnect", lambda: len(a.storage_reputation()) == 2, DEADLINE
    )
    # The records were read back from disk: the uptime earlier connections earned is there (a
    # record made afresh at the reconnection shows none until that connection ends).
    after = a.storage_reputation()
    assert all(after.get(device) for device in reputation), after
    assert all(after[d]["uptime_s"] >= r["uptime_s"] for d, r in reputation.items())
    assert any(r["uptime_s"] > 0 for r in after.values())  # s1 and s2 restarted above
    a.restart("kill")
    check_device_and_storage(a, mine, m1, m2, held["a"], token)

    # -- the mailbox: a2 comes back while a is off; only s2 (restarted) can tell it ------------
    a.stop()
    a2.start()
    wait_for(
        "a2 pulls a's link and deletion from the restarted s2's mailbox",
        lambda: a2.ids() == mine and (m1, m2, "seen-with") in a2.edges(m1),
        DEADLINE,
    )
    assert a2.status()["tombstones"] == 1

    # -- a device only: kill -9 + start; it finds a again through the restarted nodes' DHT -----
    a.start()
    a2.restart("kill")
    assert a2.ids() == mine and (m1, m2, "seen-with") in a2.edges(m1)
    assert a2.status()["tombstones"] == 1
    assert a2.storage_held() == (0, 0)
    wait_for(
        "a2 and a find each other through the DHT after every restart",
        lambda: any(
            p["kind"] == "device" and p["state"] == "connected"
            for p in a2.request(api.Peers())["peers"]
        ),
        DEADLINE,
    )
    parallel(s1.stop, s2.stop, a.stop, a2.stop)


def check_device_and_storage(
    a: Node, mine: set[str], m1: str, m2: str, held: tuple[int, int], token: str
) -> None:
    """What a held before its restart, right after it: memories, link, tombstone, placements,
    the shards and mailbox items it holds for s1, and its REST token."""
    assert a.ids() == mine
    assert (m1, m2, "seen-with") in a.edges(m1)
    status = a.status()
    assert status["memories"] == 3 and status["tombstones"] == 1
    assert status["durability"]["memories_placed"] == 3
    assert a.storage_held() == held
    (url,) = a.api_urls
    answer = httpx.get(f"{url}/v1/status", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 200, answer.text
