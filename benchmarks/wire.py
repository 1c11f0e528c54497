"""Benchmark the wire layer on loopback: Noise-over-WebSocket against raw trio-websocket.

    .venv/bin/python benchmarks/wire.py [--quick]

Writes benchmarks/out/wire.json and .md (--out benchmarks/results to replace the committed
results). Every
comparison is a ratio between runs made in this same process, with the same
WebSocket settings, so machine speed cancels out. Bounded to well under two
minutes (``--quick`` for a smoke run of a few seconds).

What is measured:
- throughput, one direction, for 64 KiB application messages (and a few other
  sizes): raw = `trio_websocket` binary messages of that size; noise = the same
  bytes as a ``bench.blob`` message through `SecureConnection` (msgpack, chunked
  to Noise-sized frames, encrypted, then WebSocket), in the suite a node on this
  machine dials with (`wire.preferred_suite`) and, beside it, in ChaChaPoly;
- handshake rate: the sans-IO XX + identity handshake alone, and a full
  dial (TCP + WebSocket upgrade + Noise) compared with a raw WebSocket dial;
- bytes of overhead per message, computed from the actual frames produced.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
import trio_websocket

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wire import (  # noqa: E402 - needs the repo root on sys.path when run as a script
    BASE_REGISTRY,
    MAX_CHUNK_PAYLOAD,
    MAX_FRAME_SIZE,
    Bytes,
    MessageStream,
    MessageType,
    Mode,
    SecureConnection,
    Suite,
    preferred_suite,
    protocol_name,
    secure_connection,
)
from wire._framing import pack_frames, unpack_frames  # noqa: E402
from wire.testing import new_device, open_channel_pair  # noqa: E402
from wire.websocket import (  # noqa: E402
    MESSAGE_QUEUE_SIZE,
    RECEIVE_BUFFER_BYTES,
    WebSocketNetwork,
)

BLOB = MessageType("bench.blob", {"data": Bytes(8 * 1024 * 1024)})
REGISTRY = BASE_REGISTRY.extended(BLOB)
KIB = 1024
#: Where runs go unless --out says otherwise (gitignored): a run never overwrites tracked files.
OUT = ROOT / "benchmarks" / "out"


def _ws_kwargs() -> dict[str, Any]:
    # Same settings for raw and Noise runs; raw needs room for a 1 MiB message.
    return {
        "max_message_size": 2 * 1024 * 1024,
        "receive_buffer_size": RECEIVE_BUFFER_BYTES,
        "message_queue_size": MESSAGE_QUEUE_SIZE,
    }


async def _raw_throughput(size: int, count: int) -> tuple[float, float]:
    payload = bytes(size)
    done = trio.Event()

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        for _ in range(count):
            await ws.get_message()
        await ws.send_message(b"done")
        done.set()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: trio_websocket.serve_websocket(
                handler, "127.0.0.1", 0, None, task_status=task_status, **_ws_kwargs()
            )
        )
        async with trio_websocket.open_websocket(
            "127.0.0.1", server.port, "/", use_ssl=False, **_ws_kwargs()
        ) as ws:
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(count):
                await ws.send_message(payload)
            await ws.get_message()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        await done.wait()
        nursery.cancel_scope.cancel()
    return size * count / elapsed, size * count / cpu


async def _noise_throughput(
    size: int, count: int, suite: Suite | None = None
) -> tuple[float, float]:
    payload = bytes(size)
    network = WebSocketNetwork()
    server_creds, client_creds = new_device(), new_device()

    async def handler(stream: MessageStream) -> None:
        connection = await secure_connection(
            stream, server_creds, initiator=False, registry=REGISTRY
        )
        for _ in range(count):
            await connection.receive()
        await connection.send(BLOB(data=b"done"))

    async with trio.open_nursery() as nursery:
        address = await nursery.start(network.listen, "ws://127.0.0.1:0", handler)
        async with network.dial(address) as stream:
            connection = await secure_connection(
                stream, client_creds, initiator=True, registry=REGISTRY, suite=suite
            )
            message = BLOB(data=payload)
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(count):
                await connection.send(message)
            await connection.receive()
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            await connection.aclose()
        nursery.cancel_scope.cancel()
    return size * count / elapsed, size * count / cpu


async def _rate(action: Callable[[], Awaitable[None]], seconds: float, min_count: int = 5) -> float:
    count, start = 0, time.perf_counter()
    while count < min_count or time.perf_counter() - start < seconds:
        await action()
        count += 1
    return count / (time.perf_counter() - start)


async def _dial_rates(seconds: float) -> dict[str, float]:
    network = WebSocketNetwork()
    server_creds, client_creds = new_device(), new_device()

    async def noise_handler(stream: MessageStream) -> None:
        try:
            connection = await secure_connection(stream, server_creds, initiator=False)
            await connection.receive()
        except Exception:
            pass

    async def raw_handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            await ws.get_message()

    async with trio.open_nursery() as nursery:
        noise_address = await nursery.start(network.listen, "ws://127.0.0.1:0", noise_handler)
        raw_server = await nursery.start(
            lambda task_status: trio_websocket.serve_websocket(
                raw_handler, "127.0.0.1", 0, None, task_status=task_status
            )
        )

        async def noise_dial() -> None:
            async with network.dial(noise_address) as stream:
                connection: SecureConnection = await secure_connection(
                    stream, client_creds, initiator=True
                )
                await connection.aclose()

        async def raw_dial() -> None:
            async with trio_websocket.open_websocket(
                "127.0.0.1", raw_server.port, "/", use_ssl=False
            ):
                pass

        raw = await _rate(raw_dial, seconds)
        noise = await _rate(noise_dial, seconds)
        nursery.cancel_scope.cancel()
    return {"raw_ws_dials_per_s": raw, "noise_ws_dials_per_s": noise}


def _sans_io_handshakes_per_s(seconds: float) -> float:
    a_creds, b_creds = new_device(), new_device()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        open_channel_pair(a_creds, b_creds)
        count += 1
    return count / (time.perf_counter() - start)


def _sans_io_cpu_us(sizes: list[int], count: int = 300) -> list[dict[str, Any]]:
    """CPU µs per message in our code alone (both sides, no sockets): send (encode, chunk,
    encrypt), pack into WebSocket payloads, unpack, receive (decrypt, reassemble, decode).
    Best of three rounds of process CPU time, so other processes on the machine barely move
    it (unlike the wall-clock ratios above)."""
    a, b = open_channel_pair(new_device(), new_device(), registry=REGISTRY)
    rows = []
    for size in sizes:
        message = BLOB(data=bytes(size))
        stages = {"send": 0.0, "pack": 0.0, "unpack": 0.0, "receive": 0.0}
        best = dict.fromkeys(stages, float("inf"))
        for _ in range(3):
            spent = dict.fromkeys(stages, 0.0)
            for _ in range(count):
                t0 = time.process_time()
                frames = a.send(message)
                t1 = time.process_time()
                payloads = pack_frames(frames)
                t2 = time.process_time()
                received = [f for p in payloads for f in unpack_frames(p)]
                t3 = time.process_time()
                for frame in received:
                    b.receive_frame(frame)
                t4 = time.process_time()
                for stage, seconds in zip(
                    stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True
                ):
                    spent[stage] += seconds
            for stage in stages:
                best[stage] = min(best[stage], spent[stage] / count * 1e6)
        row: dict[str, Any] = {
            "message_bytes": size,
            **{f"{k}_us": round(v, 1) for k, v in best.items()},
        }
        row["total_us"] = round(sum(best.values()), 1)
        rows.append(row)
    return rows


def _ws_header_bytes(payload: int, masked: bool) -> int:
    """RFC 6455 5.2 frame header for one unfragmented binary message."""
    base = 2 if payload < 126 else 4 if payload < 65536 else 10
    return base + (4 if masked else 0)


def _overhead(sizes: list[int]) -> list[dict[str, Any]]:
    a, _ = open_channel_pair(new_device(), new_device(), registry=REGISTRY)
    rows = []
    for size in sizes:
        frames = a.send(BLOB(data=bytes(size)))
        noise_bytes = sum(len(frame) for frame in frames)
        # On the wire: two length-prefixed frames per WebSocket message (wire._framing).
        ws_payloads = pack_frames(frames)
        ws_masked = sum(_ws_header_bytes(len(p), True) + len(p) for p in ws_payloads)
        ws_masked -= noise_bytes
        raw_ws_masked = _ws_header_bytes(size, True)
        rows.append(
            {
                "payload_bytes": size,
                "frames": len(frames),
                "ws_messages": len(ws_payloads),
                "noise_bytes": noise_bytes,
                "noise_overhead_bytes": noise_bytes - size,
                "ws_client_bytes_noise": noise_bytes + ws_masked,
                "ws_client_bytes_raw": size + raw_ws_masked,
                "total_overhead_vs_raw_ws_bytes": noise_bytes + ws_masked - size - raw_ws_masked,
            }
        )
    return rows


async def _throughputs(sizes: list[int], volume: int, repeats: int) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        # Enough messages for a stable figure, few enough to keep the run short.
        count = min(2000, max(16, volume // size))
        raw_runs, noise_runs, chacha_runs = [], [], []
        for _ in range(repeats):  # interleaved so load drift affects all equally
            raw_runs.append(await _raw_throughput(size, count))
            noise_runs.append(await _noise_throughput(size, count))
            chacha_runs.append(await _noise_throughput(size, count, Suite.CHACHAPOLY))
        raw = statistics.median(run[0] for run in raw_runs)
        noise = statistics.median(run[0] for run in noise_runs)
        chacha = statistics.median(run[0] for run in chacha_runs)
        raw_cpu = statistics.median(run[1] for run in raw_runs)
        noise_cpu = statistics.median(run[1] for run in noise_runs)
        chacha_cpu = statistics.median(run[1] for run in chacha_runs)
        rows.append(
            {
                "message_bytes": size,
                "messages_per_run": count,
                "runs": repeats,
                "raw_MBps": raw / 1e6,
                "noise_MBps": noise / 1e6,
                "ratio": noise / raw,
                "raw_MB_per_cpu_s": raw_cpu / 1e6,
                "noise_MB_per_cpu_s": noise_cpu / 1e6,
                "cpu_ratio": noise_cpu / raw_cpu,
                "chachapoly_MBps": chacha / 1e6,
                "chachapoly_ratio": chacha / raw,
                "chachapoly_cpu_ratio": chacha_cpu / raw_cpu,
            }
        )
        print(
            f"  {size:>8} B: raw {raw / 1e6:7.1f} MB/s  noise {noise / 1e6:7.1f} MB/s"
            f"  ratio {noise / raw:.2f}  (per CPU-second: {noise_cpu / raw_cpu:.2f});"
            f"  ChaChaPoly {chacha / raw:.2f} ({chacha_cpu / raw_cpu:.2f})",
            flush=True,
        )
    return rows


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        "# wire benchmark (loopback)",
        "",
        f"`{results['command']}` on {results['machine']}, Python {results['python']}.",
        f"Noise = `{results['noise_protocol']}` (the suite this machine dials with,"
        " `wire.preferred_suite`) + msgpack + chunking inside WebSocket; ChaChaPoly = the same"
        " with `Noise_XX_25519_ChaChaPoly_BLAKE2b`, the suite of machines without fast AES;"
        " raw = trio-websocket binary messages, same settings, same process.",
        "",
        "## Throughput (one direction, median of runs)",
        "",
        "Wall-clock MB/s, and MB per CPU-second of this process (client and server share one"
        " thread, so on a busy machine the CPU figure is the steadier one).",
        "",
        "| message | raw MB/s | Noise MB/s | Noise / raw | raw MB/cpu-s | Noise MB/cpu-s |"
        " Noise / raw (CPU) | ChaChaPoly / raw | ChaChaPoly / raw (CPU) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["throughput"]:
        lines.append(
            f"| {row['message_bytes']} B | {row['raw_MBps']:.1f} | "
            f"{row['noise_MBps']:.1f} | {row['ratio']:.2f} | {row['raw_MB_per_cpu_s']:.1f} | "
            f"{row['noise_MB_per_cpu_s']:.1f} | {row['cpu_ratio']:.2f} | "
            f"{row['chachapoly_ratio']:.2f} | {row['chachapoly_cpu_ratio']:.2f} |"
        )
    hs = results["handshakes"]
    lines += [
        "",
        f"Goal: Noise ≥ 0.70 × raw for 64 KiB messages → wall **{results['goal_64k_ratio']:.2f}**"
        f" ({'met' if results['goal_64k_ratio'] >= 0.7 else 'NOT met'}), per CPU-second"
        f" **{results['goal_64k_cpu_ratio']:.2f}**"
        f" ({'met' if results['goal_64k_cpu_ratio'] >= 0.7 else 'NOT met'}).",
        f"Load average during the run: {results['load_average']}.",
        "",
        "A Noise message is at most 65 535 bytes, so a 65 536-byte payload (plus its msgpack"
        " header) needs a second, tiny frame; since issue 17 both travel in one WebSocket message"
        " (up to two length-prefixed Noise messages each), so it no longer costs a"
        " second WebSocket message. The largest payload that fits one frame"
        f" ({results['single_frame_payload']} B) is the row just above it.",
        "",
        "## Handshakes",
        "",
        f"- sans-IO XX + identity verification (both sides, one core):"
        f" {hs['sans_io_handshakes_per_s']:.0f}/s",
        f"- full dial over loopback (TCP + WS upgrade + Noise + close):"
        f" {hs['noise_ws_dials_per_s']:.0f}/s vs raw WS dial {hs['raw_ws_dials_per_s']:.0f}/s",
        "",
    ]
    lines += [
        "## CPU in our code per message (sans-IO, both sides, no sockets)",
        "",
        "Process CPU time, best of three rounds: steadier than the wall-clock ratios on a"
        " shared machine. send = encode + chunk + encrypt; receive = decrypt + reassemble +"
        " decode.",
        "",
        "| message | send µs | pack µs | unpack µs | receive µs | total µs |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["sans_io_cpu"]:
        lines.append(
            f"| {row['message_bytes']} B | {row['send_us']} | {row['pack_us']} | "
            f"{row['unpack_us']} | {row['receive_us']} | {row['total_us']} |"
        )
    lines += [
        "",
        "## Bytes of overhead per application message",
        "",
        "| payload | Noise frames | WS messages | Noise bytes | overhead inside WS |"
        " extra on the wire vs raw WS |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["overhead"]:
        lines.append(
            f"| {row['payload_bytes']} | {row['frames']} | {row['ws_messages']} | "
            f"{row['noise_bytes']} | "
            f"{row['noise_overhead_bytes']} | {row['total_overhead_vs_raw_ws_bytes']} |"
        )
    lines += [
        "",
        "Overhead inside WS = msgpack map + type tag + field name + bin header, 1-byte chunk"
        " header and 16-byte tag per frame (both suites). Extra on the wire also counts the 2-byte"
        " length prefix of each frame and the WebSocket headers (client→server, masked).",
        "",
    ]
    return "\n".join(lines)


def _largest_single_frame_payload() -> int:
    """Largest ``bench.blob`` payload whose encoded message still fits one Noise frame."""
    size = MAX_CHUNK_PAYLOAD
    while len(REGISTRY.encode(BLOB(data=bytes(size)))) > MAX_CHUNK_PAYLOAD:
        size -= 1
    return size


async def main(quick: bool) -> dict[str, Any]:
    sizes = [1 * KIB, 16 * KIB, _largest_single_frame_payload(), 64 * KIB, 1024 * KIB]
    volume = (8 if quick else 64) * 1024 * 1024
    repeats = 1 if quick else 5
    started = time.perf_counter()
    print("throughput (raw trio-websocket vs Noise over WebSocket):", flush=True)
    throughput = await _throughputs(sizes, volume, repeats)
    print("handshakes...", flush=True)
    handshakes = {"sans_io_handshakes_per_s": _sans_io_handshakes_per_s(0.5 if quick else 3)}
    handshakes.update(await _dial_rates(0.5 if quick else 3))
    row_64k = next(r for r in throughput if r["message_bytes"] == 64 * KIB)
    return {
        "command": "python benchmarks/wire.py" + (" --quick" if quick else ""),
        "noise_protocol": protocol_name(Mode.STORAGE, preferred_suite()),
        "machine": f"{platform.machine()} {platform.system()}",
        "python": platform.python_version(),
        "max_frame_bytes": MAX_FRAME_SIZE,
        "throughput": throughput,
        "single_frame_payload": sizes[2],
        "goal_64k_ratio": row_64k["ratio"],
        "goal_64k_cpu_ratio": row_64k["cpu_ratio"],
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "handshakes": handshakes,
        "overhead": _overhead([0, 100, 1 * KIB, 64 * KIB - 32, 64 * KIB, 1024 * KIB]),
        "sans_io_cpu": _sans_io_cpu_us(sizes[:4], 30 if quick else 300),
        "seconds": time.perf_counter() - started,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds, for smoke tests")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for wire.json and .md")
    args = parser.parse_args()
    results = trio.run(main, args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "wire.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "wire.md").write_text(_markdown(results))
    print(_markdown(results))
