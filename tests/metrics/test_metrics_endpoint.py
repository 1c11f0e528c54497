"""The Prometheus endpoint of a real node (in-process actors, DuckDB on disk), scraped over
loopback HTTP and read with prometheus-client's own text parser: every metric docs/metrics.md
names exists and moves when what it counts happens."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from actors.node import (
    NetworkSettings,
    RunningNode,
    open_node,
    start_metrics_endpoint,
    start_networking,
)
from actors.runtime import ActorSpec, Mailbox
from dmgn import api
from dmgn.embedding import HashingEmbedder
from wire import MemoryNetwork

SEED = bytes(range(32))
DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(bound: tuple[str, int], path: str = "/metrics") -> tuple[int, str]:
    stream = await trio.open_tcp_stream(*bound)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        with trio.fail_after(20):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def samples(bound: tuple[str, int]) -> Samples:
    status, text = await scrape(bound)
    assert status == 200
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def documented_metrics() -> set[str]:
    return set(re.findall(r"^\| `(dmgn_[a-z_]+)`", DOCS.read_text(), re.MULTILINE))


@asynccontextmanager
async def node_pair(tmp_path: Path) -> AsyncIterator[tuple[RunningNode, RunningNode]]:
    network = MemoryNetwork()
    (tmp_path / "a").mkdir()
    async with (
        open_node(SEED, os.urandom(16), tmp_path / "a", embedder=HashingEmbedder()) as a,
        open_node(SEED, os.urandom(16), None, embedder=HashingEmbedder()) as b,
    ):
        for node, name, peers in ((a, "a", ()), (b, "b", ("mem://a",))):
            settings = NetworkSettings(
                listen_addr=f"mem://{name}", bootstrap=peers, discovery=False, redial_interval=0.5
            )
            await start_networking(node, network, settings, None)
        yield a, b


async def wait_for(
    bound: tuple[str, int], key: tuple[str, tuple[tuple[str, str], ...]], at_least: float
) -> Samples:
    with trio.fail_after(20):
        while True:
            now = await samples(bound)
            if now.get(key, -1.0) >= at_least:
                return now
            await trio.sleep(0.05)


def value(s: Samples, name: str, **labels: str) -> float:
    return s.get((name, tuple(sorted(labels.items()))), -1.0)


async def test_every_documented_metric_exists_and_moves(tmp_path: Path) -> None:
    async with node_pair(tmp_path) as (a, b):
        bound = await start_metrics_endpoint(a, "127.0.0.1:0")
        assert bound[0] == "127.0.0.1"
        before = await samples(bound)
        families = {
            f.name + ("_total" if f.type == "counter" else "")
            for f in text_string_to_metric_families((await scrape(bound))[1])
        }
        assert len(documented_metrics()) == 14
        assert documented_metrics() <= families, documented_metrics() - families

        # Local writes and reads.
        first = (await a.request(api.AddMemory(content="pelicans nest on the cliff " * 50)))["id"]
        second = (await a.request(api.AddMemory(content="gulls too")))["id"]
        await a.request(api.LinkMemories(from_id=first, to_id=second))
        await a.request(api.QueryMemories(text="pelicans"))
        await a.request(api.DeleteMemory(id=second))
        after = await samples(bound)
        assert value(after, "dmgn_memories") == value(before, "dmgn_memories") + 1
        assert (
            value(after, "dmgn_memories_added_total")
            == value(before, "dmgn_memories_added_total") + 2
        )
        assert value(after, "dmgn_tombstones") == value(before, "dmgn_tombstones") + 1
        assert value(after, "dmgn_memories_deleted_total", reason="user") == 1
        assert (
            value(after, "dmgn_query_seconds_count")
            == value(before, "dmgn_query_seconds_count") + 1
        )
        assert value(after, "dmgn_store_bytes") > value(before, "dmgn_store_bytes")
        # The link went with the deleted memory; a link between live ones stays counted.
        third = (await a.request(api.AddMemory(content="terns")))["id"]
        await a.request(api.LinkMemories(from_id=first, to_id=third))
        assert value(await samples(bound), "dmgn_links") == value(before, "dmgn_links") + 1

        # The other device: connected peers, per-device lag, and ops it applies from us.
        synced = await wait_for(bound, ("dmgn_peers_connected", ()), 1)
        assert any(name == "dmgn_sync_lag_entries" for name, _ in synced)
        status_b = await b.request(api.Status())
        with trio.fail_after(20):
            while status_b["metrics"]["dmgn_sync_ops_applied_total"] < 5:
                await trio.sleep(0.05)
                status_b = await b.request(api.Status())
        await b.request(api.AddMemory(content="written on b"))
        await wait_for(bound, ("dmgn_sync_ops_applied_total", ()), 1)

        # A crash that is restarted, and an inbox that fills.
        crashes: list[str] = []
        await a.supervisor.start(
            ActorSpec("crashy", lambda: _CrashesOnce(crashes), backoff_initial=0.01)
        )
        stuck: Mailbox[int] = Mailbox("stuck", 8)
        await a.supervisor.start(ActorSpec("stuck", _NeverReads, stuck))
        for i in range(3):
            await stuck.address.send(i)
        moved = await wait_for(bound, ("dmgn_actor_restarts_total", (("actor", "crashy"),)), 1)
        assert value(moved, "dmgn_inbox_depth", actor="stuck") == 3
        assert value(moved, "dmgn_inbox_depth", actor="store") == 0

        # The storage gauges mirror the status' storage and durability sections at each
        # scrape (tests/storage/test_storage_metrics.py moves them over a real cluster): no
        # storage peers here, so nothing is held and the one live memory waits, not durable.
        held = await samples(bound)
        sections = await a.request(api.Status())
        assert value(held, "dmgn_storage_held_bytes") == sections["storage"]["bytes_held"] == 0
        assert sections["durability"]["durable_fraction"] == 0.0
        assert value(held, "dmgn_shard_durability") == 0.0

        # The same numbers in `dmgn status --json`.
        status = await a.request(api.Status())
        assert status["metrics"]["dmgn_memories"] == status["memories"]
        assert status["metrics"]["adds_per_s"] > 0


async def test_endpoint_serves_only_get_metrics_and_stays_up(tmp_path: Path) -> None:
    async with open_node(SEED, os.urandom(16), None, embedder=HashingEmbedder()) as node:
        bound = await start_metrics_endpoint(node, "127.0.0.1:0")
        assert (await scrape(bound, "/nope"))[0] == 404
        stream = await trio.open_tcp_stream(*bound)
        async with stream:
            await stream.send_all(b"\x00garbage\r\n\r\n")
            assert b" 400 " in await stream.receive_some(1024)
        assert (await scrape(bound))[0] == 200


async def test_slow_clients_filling_every_slot_do_not_keep_a_scrape_out(tmp_path: Path) -> None:
    # Sixteen clients that connect and never finish their request head (two per slot) held
    # all eight slots for REQUEST_TIMEOUT each, so a scrape arriving then was closed unanswered.
    async with open_node(SEED, os.urandom(16), None, embedder=HashingEmbedder()) as node:
        bound = await start_metrics_endpoint(node, "127.0.0.1:0")
        slow = []
        for _ in range(16):
            stream = await trio.open_tcp_stream(*bound)
            await stream.send_all(b"GET /metrics HTTP/1.1\r\n")  # and nothing more
            slow.append(stream)
        await trio.testing.wait_all_tasks_blocked()
        for _ in range(3):  # while the slow ones are still there
            status, body = await scrape(bound)
            assert status == 200 and "dmgn_memories" in body
        for stream in slow:
            await stream.aclose()


class _CrashesOnce:
    """The first incarnation crashes after saying it is ready (noted in ``crashes``); the
    restarted one idles."""

    def __init__(self, crashes: list[str]) -> None:
        self._crashes = crashes

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if not self._crashes:
            self._crashes.append("boom")
            raise RuntimeError("boom")
        await trio.sleep_forever()


class _NeverReads:
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()
