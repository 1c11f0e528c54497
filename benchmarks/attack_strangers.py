"""Issue 12 under attack: strangers hold a node's connections and memory; our own device gets in.

    .venv/bin/python benchmarks/attack_strangers.py [--idle 70] [--partial 70] [--attack 60]

Writes benchmarks/results/attack_strangers.json and .md. Takes about two minutes.

Setup: device A is a real `dmgn-node` (started with `dmgn start`, default limits, listening on
127.0.0.1, mDNS off). This process plays `--idle` strangers that complete the Noise handshake
and then say nothing, and `--partial` strangers that each start a 16 MiB message and never
finish it, every one with a fresh identity, leaving from 127.0.0.10 onwards (five strangers per
address), coming back about a second after each refusal or close. After `--attack` seconds of
that, device B (same identity, `dmgn import`ed, A as its only bootstrap peer) is started with
`dmgn start`; the attack goes on.

Measured: A's RSS every second (from /proc, the whole run); the time from B's `dmgn start`
until B holds the memory written on A before the attack (connects and syncs); `dmgn status`
on A during the attack (the control-socket round trip, and the whole CLI process); how many
strangers A holds (``dmgn peers``) and why the strangers were closed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))  # after the repo root: benchmarks/wire.py is no package

from attackers import AttackStats, idle_stranger, partial_stranger  # noqa: E402

from dmgn import api  # noqa: E402
from dmgn.app.control_client import call  # noqa: E402
from dmgn.paths import DataDir  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PASSPHRASE = "attack-benchmark"
#: Strangers per source address (the node admits at most 8 per address).
PER_ADDRESS = 5


def free_port() -> int:
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


class Device:
    def __init__(self, root: Path, name: str) -> None:
        self.root = root / name
        self.port = free_port()
        self.address = f"ws://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "DMGN_DATA_DIR": str(self.root),
            "DMGN_PASSPHRASE": PASSPHRASE,
            "DMGN_EMBEDDER": "hashing",
        }
        self.pid: int | None = None

    def run(self, *args: str, timeout: float = 120) -> Any:
        done = subprocess.run(
            [sys.executable, "-m", "dmgn.app.cli", *args, "--json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"dmgn {' '.join(args)}: {done.stderr.strip()}")
        return json.loads(done.stdout) if done.stdout.strip() else None

    def configure(self, bootstrap: list[str]) -> None:
        path = self.root / "config.json"
        document = json.loads(path.read_text())
        document.update(
            listen_addr=self.address, bootstrap_peers=bootstrap, mdns=False, sync_interval="5s"
        )
        path.write_text(json.dumps(document))

    def start(self) -> None:
        self.pid = int(self.run("start")["pid"])

    def request(self, request: api.AnyRequest) -> dict[str, Any]:
        return call(DataDir(self.root), request)

    def kill(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def synced(device: Device, memory_id: str) -> None:
    """Wait until ``device`` holds ``memory_id`` (it connected and synced)."""
    with trio.fail_after(120):
        while True:
            with contextlib.suppress(Exception):  # a daemon still starting: ask again
                ids = await trio.to_thread.run_sync(
                    device.request, api.QueryMemories(recent=True, limit=10)
                )
                if memory_id in {r["id"] for r in ids["results"]}:
                    return
            await trio.sleep(0.05)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="dmgn-attack-"))
    a, b = Device(root, "a"), Device(root, "b")
    try:
        a.run("init")
        a.configure([])
        backup = root / "identity.backup"
        a.run("export", "-o", str(backup))
        b.run("import", "-i", str(backup))
        b.configure([a.address])
        a.start()
        assert a.pid is not None
        marker = str(a.run("add", "written on A before the attack")["id"])
        # Baseline: B's start and first sync with nobody attacking.
        t0 = time.monotonic()
        await trio.to_thread.run_sync(b.start)
        await synced(b, marker)
        baseline_synced = round(time.monotonic() - t0, 2)
        await trio.to_thread.run_sync(b.run, "stop")
        quiet_status = []
        for _ in range(5):
            t0 = time.monotonic()
            await trio.to_thread.run_sync(a.request, api.Status())
            quiet_status.append(time.monotonic() - t0)
        started = time.monotonic()
        curve: list[tuple[float, float]] = []
        status_socket: list[float] = []
        status_cli: list[float] = []
        idle, partial = AttackStats(), AttackStats()
        result: dict[str, Any] = {
            "b_connected_and_synced_no_attack_s": baseline_synced,
            "status_socket_no_attack_max_s": round(max(quiet_status), 3),
        }

        async def sample() -> None:
            while True:
                curve.append((round(time.monotonic() - started, 1), round(rss_mb(a.pid), 1)))
                await trio.sleep(1.0)

        async def statuses() -> None:
            while True:
                t0 = time.monotonic()
                await trio.to_thread.run_sync(a.request, api.Status())
                status_socket.append(time.monotonic() - t0)
                t0 = time.monotonic()
                await trio.to_thread.run_sync(a.run, "status")
                status_cli.append(time.monotonic() - t0)
                await trio.sleep(2.0)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            for i in range(args.idle):
                source = f"127.0.0.{10 + i // PER_ADDRESS}"
                nursery.start_soon(idle_stranger, a.address, source, idle)
            for i in range(args.partial):
                source = f"127.0.0.{10 + (args.idle + i) // PER_ADDRESS}"
                nursery.start_soon(partial_stranger, a.address, source, partial)
            await trio.sleep(5)
            nursery.start_soon(statuses)
            await trio.sleep(max(0.0, args.attack - 5))
            peers_before = await trio.to_thread.run_sync(a.request, api.Peers())
            result["strangers_held_at_b_start"] = sum(
                1
                for p in peers_before["peers"]
                if p.get("state") == "connected" and p.get("kind") != "device"
            )
            result["rss_before_b_mb"] = round(rss_mb(a.pid), 1)
            t0 = time.monotonic()
            await trio.to_thread.run_sync(b.start)
            result["b_daemon_ready_s"] = round(time.monotonic() - t0, 2)
            await synced(b, marker)
            result["b_connected_and_synced_s"] = round(time.monotonic() - t0, 2)
            await trio.sleep(10)  # the attack goes on with B connected
            peers = await trio.to_thread.run_sync(a.request, api.Peers())
            result["a_peers_at_end"] = {
                "devices": sum(
                    1
                    for p in peers["peers"]
                    if p.get("state") == "connected" and p.get("kind") == "device"
                ),
                "strangers": sum(
                    1
                    for p in peers["peers"]
                    if p.get("state") == "connected" and p.get("kind") != "device"
                ),
            }
            nursery.cancel_scope.cancel()
        rss = [mb for _, mb in curve]
        result.update(
            {
                "idle_strangers": args.idle,
                "partial_strangers": args.partial,
                "attack_s_before_b": args.attack,
                "rss_curve_mb": curve,
                "rss_start_mb": rss[0],
                "rss_max_mb": max(rss),
                "rss_end_mb": rss[-1],
                "status_socket_max_s": round(max(status_socket), 3),
                "status_socket_median_s": round(sorted(status_socket)[len(status_socket) // 2], 3),
                "status_cli_max_s": round(max(status_cli), 3),
                "status_samples": len(status_socket),
                "idle_handshakes": idle.handshakes,
                "idle_closes": idle.closes,
                "partial_handshakes": partial.handshakes,
                "partial_closes": partial.closes,
                "partial_bytes_sent_mb": round(partial.bytes_parked / 2**20, 1),
            }
        )
        return result
    finally:
        a.kill()
        b.kill()
        shutil.rmtree(root, ignore_errors=True)


def _table(rows: list[tuple[str, str]]) -> str:
    lines = [
        "| measure | value |",
        "|---|---|",
        *(f"| {label} | {value} |" for label, value in rows),
    ]
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    curve = result["rss_curve_mb"]
    step = max(1, len(curve) // 20)
    rows = "\n".join(f"| {t:.0f} | {mb:.0f} |" for t, mb in curve[::step])
    r = result
    table = _table(
        [
            (
                "B: `dmgn start` until it holds A's memory (connect + sync)",
                f"{r['b_connected_and_synced_s']} s",
            ),
            ("B: `dmgn start` until the daemon is ready", f"{r['b_daemon_ready_s']} s"),
            (
                "B, for comparison, with nobody attacking: `dmgn start` until synced",
                f"{r['b_connected_and_synced_no_attack_s']} s",
            ),
            (
                f"A: `dmgn status`, control-socket round trip (max / median, "
                f"{r['status_samples']} samples)",
                f"{r['status_socket_max_s']} s / {r['status_socket_median_s']} s",
            ),
            (
                "A, for comparison, with nobody attacking: `dmgn status` round trip (max of 5)",
                f"{r['status_socket_no_attack_max_s']} s",
            ),
            ("A: `dmgn status --json`, whole CLI process (max)", f"{r['status_cli_max_s']} s"),
            (
                "A: RSS at start / max / end",
                f"{r['rss_start_mb']} / {r['rss_max_mb']} / {r['rss_end_mb']} MB",
            ),
            ("A: strangers held when B started", f"{r['strangers_held_at_b_start']}"),
            (
                "A: connected at the end (devices / strangers)",
                f"{r['a_peers_at_end']['devices']} / {r['a_peers_at_end']['strangers']}",
            ),
            (
                "strangers' handshakes completed (idle / partial)",
                f"{r['idle_handshakes']} / {r['partial_handshakes']}",
            ),
            ("partial strangers' bytes sent", f"{r['partial_bytes_sent_mb']} MiB"),
        ]
    )
    return f"""# Strangers attacking a node (issue 12): results

`benchmarks/attack_strangers.py`: A is a real `dmgn-node` with default limits;
{result["idle_strangers"]} idle strangers and {result["partial_strangers"]} strangers each
starting a 16 MiB message they never finish attack it (fresh identities, 5 per source address,
reconnecting about a second after each close) for {result["attack_s_before_b"]} s; then our
second device B starts (`dmgn start`) with A as its only bootstrap peer; the attack goes on.
Machine: {platform.machine()}, {os.cpu_count()} cores shared with other work.

{table}


Why strangers were closed (idle): `{result["idle_closes"]}`

Why strangers were closed (partial): `{result["partial_closes"]}`

RSS of A over the run (seconds since A started, MB):

| t (s) | RSS (MB) |
|---|---|
{rows}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle", type=int, default=70)
    parser.add_argument("--partial", type=int, default=70)
    parser.add_argument("--attack", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = trio.run(run, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attack_strangers.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "attack_strangers.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
