"""Benchmark the REST API against the control socket, and the query router's fan-out.

    .venv/bin/python benchmarks/rest.py [--quick]

Writes benchmarks/results/rest.json and benchmarks/results/rest.md (``rest.quick.*`` with
--quick). Bounded to a few minutes.

1. REST vs control socket, one run, one daemon: a real `dmgn-node` process (lexical embedder,
   loopback, mDNS off) over a data dir holding 10,000 memories (written offline first, in this
   process, through the same service). The same text query (limit 10) is sent N times over
   each path, interleaved round by round so both see the same machine load:
   - REST, one keep-alive connection (httpx.Client), and REST with a new connection each time;
   - control socket with one connection per request (what each `dmgn` command does), and one
     persistent connection (what an MCP relay holds).
   Latency is wall time in this client process, request sent → answer parsed.
2. Router fan-out, three devices of one identity in this process over real WebSocket + Noise on
   127.0.0.1: ``a`` and ``b`` keep everything, ``c`` keeps ``recent:1``; 1,000 memories written
   on ``a`` three days ago (its clock set back) sync to ``b`` and into ``c``'s feed but not its
   store. The same query on ``c``: routed (answered by ``a`` and ``b``, merged), against the
   local-only query (``after`` inside ``c``'s window, not routed) and the same query on ``a``
   (full: not routed). The three nodes share this one process, so one device's answer waits for
   the others' Python: real devices on separate machines only add the network round trip.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from actors import router as qr  # noqa: E402 - needs the repo root on sys.path as a script
from actors.node import NetworkSettings, open_node, start_networking  # noqa: E402
from actors.runtime import call, expect  # noqa: E402
from dmgn import api  # noqa: E402
from dmgn.app import control_client  # noqa: E402
from dmgn.app.unlock import unlock  # noqa: E402
from dmgn.control_protocol import FrameDecoder, decode_response, encode_request  # noqa: E402
from dmgn.embedding import HashingEmbedder  # noqa: E402
from dmgn.paths import DataDir  # noqa: E402
from wire.websocket import WebSocketNetwork  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PASSPHRASE = "benchmark-passphrase"
WORDS = [
    "heron",
    "kingfisher",
    "albatross",
    "river",
    "marsh",
    "canal",
    "tide",
    "harbour",
    "lantern",
    "ledger",
    "meeting",
    "budget",
    "garden",
    "tomato",
    "recipe",
    "invoice",
    "travel",
    "museum",
    "violin",
    "piano",
    "chess",
    "lecture",
    "physics",
    "orbit",
    "comet",
    "nebula",
    "mountain",
    "glacier",
    "valley",
    "forest",
]
QUERY = "kingfisher over the canal at dawn"
DAY_NS = 86_400 * 1_000_000_000


def text_for(i: int) -> str:
    picks = [WORDS[(i * 7 + k * 13) % len(WORDS)] for k in range(12)]
    return f"note {i}: " + " ".join(picks)


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {
        "n": len(samples),
        "p50_ms": at(0.50),
        "p90_ms": at(0.90),
        "p99_ms": at(0.99),
        "mean_ms": round(statistics.fmean(samples) * 1000, 3),
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- part 1: REST vs control socket -----------------------------------------------------------


class PersistentControl:
    """One control socket connection used for many requests (as an MCP relay holds one)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.decoder = FrameDecoder()
        self.next_id = 1

    def ask(self, request: api.AnyRequest) -> dict[str, Any]:
        request_id = self.next_id
        self.next_id += 1
        self.sock.sendall(encode_request(request_id, request))
        while True:
            frames = self.decoder.receive_data(self.sock.recv(1 << 16))
            if frames:
                answered, response = decode_response(frames[0])
                assert answered == request_id and not isinstance(response, Exception)
                return response

    def close(self) -> None:
        self.sock.close()


async def populate(root: Path, count: int) -> None:
    seed, device_id = unlock(DataDir(root), PASSPHRASE)
    async with open_node(seed, device_id, root, embedder=HashingEmbedder()) as node:
        limit = trio.CapacityLimiter(32)

        async def add(i: int) -> None:
            async with limit:
                await node.request(api.AddMemory(content=text_for(i)))

        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(add, i)


def rest_vs_control(memories: int, rounds: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="dmgn-bench-"))
    root = workdir / "data"
    env = {
        **os.environ,
        "DMGN_DATA_DIR": str(root),
        "DMGN_PASSPHRASE": PASSPHRASE,
        "DMGN_EMBEDDER": "hashing",
    }
    cli = [sys.executable, "-m", "dmgn.app.cli"]
    try:
        subprocess.run([*cli, "init"], env=env, check=True, capture_output=True)
        config = json.loads((root / "config.json").read_text())
        config.update(listen_addr="ws://127.0.0.1:0", mdns=False, api_port=free_port())
        (root / "config.json").write_text(json.dumps(config))
        started = time.perf_counter()
        trio.run(populate, root, memories)
        populate_s = time.perf_counter() - started
        facts = json.loads(
            subprocess.run(
                [*cli, "start", "--json"], env=env, check=True, capture_output=True, text=True
            ).stdout
        )
        url = facts["api_urls"][0]
        token = (root / "api.token").read_text().strip()
        headers = {"Authorization": f"Bearer {token}"}
        body = {"text": QUERY, "limit": 10}
        request = api.QueryMemories(text=QUERY, limit=10)
        data_dir = DataDir(root)
        keep_alive = httpx.Client(base_url=url, headers=headers, timeout=60)
        # A new TCP connection per request (the client itself is reused: building an httpx
        # client costs ~200 ms of SSL context setup, which is not the server's doing).
        no_keep_alive = httpx.Client(
            base_url=url,
            headers=headers,
            timeout=60,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        persistent = PersistentControl(data_dir.control_socket)

        def rest_keep_alive() -> dict[str, Any]:
            answer = keep_alive.post("/v1/query", json=body)
            assert answer.status_code == 200
            return dict(answer.json())

        def rest_new_connection() -> dict[str, Any]:
            answer = no_keep_alive.post("/v1/query", json=body)
            assert answer.status_code == 200
            return dict(answer.json())

        def control_per_request() -> dict[str, Any]:
            return control_client.call(data_dir, request)

        def control_persistent() -> dict[str, Any]:
            return persistent.ask(request)

        paths: dict[str, Callable[[], dict[str, Any]]] = {
            "rest_keep_alive": rest_keep_alive,
            "rest_new_connection": rest_new_connection,
            "control_per_request": control_per_request,
            "control_persistent": control_persistent,
        }
        answers = {name: fn() for name, fn in paths.items()}  # warm up, and compare
        ids = {name: [r["id"] for r in a["results"]] for name, a in answers.items()}
        assert len({tuple(v) for v in ids.values()}) == 1, ids
        samples: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(rounds):
            for name, fn in paths.items():
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
        keep_alive.close()
        no_keep_alive.close()
        persistent.close()
        status = control_client.call(data_dir, api.Status())
        subprocess.run([*cli, "stop", "--json"], env=env, check=True, capture_output=True)
        return {
            "memories": status["memories"],
            "populate_s": round(populate_s, 1),
            "query": body,
            "results_per_query": len(ids["rest_keep_alive"]),
            "latency": {name: percentiles(s) for name, s in samples.items()},
        }
    finally:
        subprocess.run([*cli, "stop", "--force"], env=env, capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


# -- part 2: router fan-out ---------------------------------------------------------------------


async def fan_out(memories: int, rounds: int, query_timeout: float) -> dict[str, Any]:
    seed = os.urandom(32)
    network = WebSocketNetwork()
    old_clock: Callable[[], int] = lambda: time.time_ns() - 3 * DAY_NS  # noqa: E731

    def settings(peers: tuple[str, ...]) -> NetworkSettings:
        return NetworkSettings(
            listen_addr="ws://127.0.0.1:0",
            bootstrap=peers,
            discovery=False,
            sync_interval=5.0,
            redial_interval=0.5,
        )

    embedder = HashingEmbedder()
    async with (
        open_node(seed, os.urandom(16), None, embedder=embedder, wall_clock=old_clock) as a,
        open_node(seed, os.urandom(16), None, embedder=embedder) as b,
        open_node(
            seed,
            os.urandom(16),
            None,
            embedder=embedder,
            replica="recent:1",
            query_timeout=query_timeout,
        ) as c,
    ):
        online_a = await start_networking(a, network, settings(()), None)
        online_b = await start_networking(b, network, settings(online_a.listen_addrs), None)
        online_c = await start_networking(
            c, network, settings((*online_a.listen_addrs, *online_b.listen_addrs)), None
        )
        limit = trio.CapacityLimiter(32)

        async def add(i: int) -> None:
            async with limit:
                await a.request(api.AddMemory(content=text_for(i)))

        async with trio.open_nursery() as nursery:
            for i in range(memories):
                nursery.start_soon(add, i)
        with trio.fail_after(300):
            while True:
                state_c = await online_c.gossip_status()
                state_b = await online_b.gossip_status()
                assert c.router is not None
                router = await expect(await call(c.router, qr.RouterState))
                full = sum(1 for _, replica, up in router.devices if up and replica == "full")
                if state_c.entries >= memories and state_b.entries >= memories and full == 2:
                    break
                await trio.sleep(0.1)
        stored_c = (await c.request(api.Status()))["memories"]
        routed = api.QueryMemories(text=QUERY, limit=10)
        local_only = api.QueryMemories(text=QUERY, limit=10, after=time.time_ns() - DAY_NS // 2)
        cases = {
            "routed_on_c": (c, routed),
            "local_only_on_c": (c, local_only),
            "full_a": (a, routed),
        }
        samples: dict[str, list[float]] = {name: [] for name in cases}
        device_ms: list[float] = []
        partial = 0
        for _ in range(rounds):
            for name, (node, request) in cases.items():
                t0 = trio.current_time()
                answer = await node.request(request)
                samples[name].append(trio.current_time() - t0)
                if name == "routed_on_c":
                    partial += bool(answer["partial"])
                    device_ms += [
                        d["ms"] for d in answer["devices"] if d["device_id"] != "local" and d["ms"]
                    ]
                    assert answer["count"] == 10
        await online_c.close()
        await online_b.close()
        await online_a.close()
        return {
            "memories_on_full_devices": memories,
            "memories_stored_on_c": stored_c,
            "query_timeout_s": query_timeout,
            "partial_answers": partial,
            "latency": {name: percentiles(s) for name, s in samples.items()},
            "per_device_answer": percentiles([ms / 1000 for ms in device_ms]),
        }


# -- report -------------------------------------------------------------------------------------


def markdown(results: dict[str, Any]) -> str:
    one = results["rest_vs_control"]
    two = results["fan_out"]
    lines = [
        "# REST API and query router benchmark",
        "",
        f"Run: {results['when']} on {results['machine']} (`benchmarks/rest.py"
        f"{' --quick' if results['quick'] else ''}`). Shared 2-core machine: other sessions "
        f"load it (1-minute load average {results['load_average'][0]:.1f} at the start, "
        f"{results['load_average_after'][0]:.1f} at the end), so compare figures within this "
        "run.",
        "",
        f"## REST vs control socket ({one['memories']:,} memories, one dmgn-node, "
        "lexical embedder)",
        "",
        f"Query `{json.dumps(one['query'])}` ({one['results_per_query']} results), "
        f"{one['latency']['rest_keep_alive']['n']} rounds, paths interleaved.",
        "",
        "| path | p50 ms | p90 ms | p99 ms | mean ms |",
        "|---|---|---|---|---|",
    ]
    for name, row in one["latency"].items():
        lines.append(
            f"| {name} | {row['p50_ms']} | {row['p90_ms']} | {row['p99_ms']} | {row['mean_ms']} |"
        )
    lines += [
        "",
        "## Router fan-out (3 devices in one process, WebSocket + Noise on loopback)",
        "",
        f"`a` and `b` full with {two['memories_on_full_devices']:,} memories; `c` "
        f"`recent:1` stores {two['memories_stored_on_c']}; query_timeout "
        f"{two['query_timeout_s']} s; {two['partial_answers']} partial answers.",
        "",
        "| query | p50 ms | p90 ms | p99 ms | mean ms |",
        "|---|---|---|---|---|",
    ]
    for name, row in {
        **two["latency"],
        "per_device_answer (as c saw it)": two["per_device_answer"],
    }.items():
        lines.append(
            f"| {name} | {row['p50_ms']} | {row['p90_ms']} | {row['p99_ms']} | {row['mean_ms']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    args = parser.parse_args()
    memories, rounds = (500, 30) if args.quick else (10_000, 300)
    fan_memories, fan_rounds = (200, 20) if args.quick else (1_000, 200)
    results: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "quick": args.quick,
        "load_average": os.getloadavg(),
    }
    results["rest_vs_control"] = rest_vs_control(memories, rounds)
    print(json.dumps(results["rest_vs_control"]["latency"], indent=1), flush=True)
    results["fan_out"] = trio.run(fan_out, fan_memories, fan_rounds, 5.0)
    print(json.dumps(results["fan_out"]["latency"], indent=1), flush=True)
    results["load_average_after"] = os.getloadavg()
    suffix = ".quick" if args.quick else ""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"rest{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"rest{suffix}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
