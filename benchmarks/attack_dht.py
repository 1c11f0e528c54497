"""Issue 12 item 4: one stranger sends a node's DHT 20,000 STOREs.

    .venv/bin/python benchmarks/attack_dht.py [--stores 20000]

Writes benchmarks/results/attack_dht.json and .md. Takes about a minute.

Setup: a real `dmgn-node` (started with `dmgn start`, listening on 127.0.0.1; its DHT binds UDP
127.0.0.1 at the same port). One stranger at 127.0.0.50 speaks kademlia's wire format and sends
``--stores`` STOREs, each claiming a new node id (so each looks like a newcomer): three in four
carry a valid sealed record under its own key (what anyone can make: a fresh key pair each),
one in four random bytes under a random key. Then it sends 2,000 FIND_VALUEs for keys it stored
(small requests, large answers) and 2,000 junk datagrams.

Measured: the node's RSS every second, its DHT record table and traffic counters (``dmgn status``
→ ``dht``), what the stranger sent and received, and how many log lines the attack left.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
import umsgpack

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))  # after the repo root: benchmarks/wire.py is no package

from attack_strangers import Device, rss_mb  # noqa: E402
from kademlia.utils import digest  # noqa: E402
from nacl.signing import SigningKey  # noqa: E402

from actors._dht import MAX_RECORDS, MAX_RECORDS_PER_SOURCE  # noqa: E402
from dmgn import api  # noqa: E402
from dmgn.peer_record import (  # noqa: E402
    RECORD_CONTEXT,
    PeerRecord,
    ProviderLocator,
    ProviderRecord,
)

RESULTS = ROOT / "benchmarks" / "results"
SOURCE = "127.0.0.50"


def request(name: str, *args: object) -> bytes:
    return b"\x00" + os.urandom(20) + umsgpack.packb([name, list(args)])


def sealed_record() -> tuple[bytes, bytes]:
    """A valid, large (~6 KiB) sealed record under its own key."""
    key = SigningKey.generate()
    now = int(time.time())
    entries = []
    for _ in range(5):
        entry = PeerRecord(
            bytes(key.verify_key),
            os.urandom(16),
            os.urandom(32),
            tuple(f"ws://host-{i}-{os.urandom(20).hex()}.example:4001" for i in range(8)),
            now,
            now + 3600,
        )
        entries.append(entry.signed(key.sign(RECORD_CONTEXT + entry.signing_payload()).signature))
    inner = ProviderRecord(bytes(key.verify_key), tuple(entries), now, now + 3600)
    inner = inner.signed(key.sign(RECORD_CONTEXT + inner.signing_payload()).signature)
    locator = ProviderLocator(os.urandom(32))
    return digest(locator.key), locator.seal(inner).encode()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="dmgn-dht-attack-"))
    node = Device(root, "a")
    sent = received = 0
    try:
        node.run("init")
        node.configure([])
        node.start()
        assert node.pid is not None
        log_file = node.root / "logs" / "dmgn-node.log"
        log_lines_before = len(log_file.read_text().splitlines()) if log_file.exists() else 0
        started = time.monotonic()
        curve: list[tuple[float, float]] = []
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
        await sock.bind((SOURCE, 0))
        target = ("127.0.0.1", node.port)
        print("making records...", flush=True)
        records = [sealed_record() for _ in range(min(args.stores, 2000))]
        record_size = sum(len(v) for _, v in records) / len(records)

        async def sample() -> None:
            while True:
                curve.append((round(time.monotonic() - started, 1), round(rss_mb(node.pid), 1)))
                await trio.sleep(1.0)

        async def receive() -> None:
            nonlocal received
            while True:
                data, _ = await sock.recvfrom(65536)
                received += len(data)

        async def send(datagram: bytes) -> None:
            nonlocal sent
            sent += len(datagram)
            await sock.sendto(datagram, target)

        phases: dict[str, float] = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            nursery.start_soon(receive)
            t0 = time.monotonic()
            for i in range(args.stores):
                if i % 4:
                    key, value = records[i % len(records)]
                    if i >= len(records):  # re-send of a record already offered
                        key, value = records[i % len(records)]
                else:
                    key, value = os.urandom(20), os.urandom(6000)
                await send(request("store", os.urandom(20), key, value))
                if i % 20 == 0:
                    await trio.sleep(0.005)  # loopback drops what a full socket buffer can't take
            phases["stores_s"] = round(time.monotonic() - t0, 1)
            t0 = time.monotonic()
            for i in range(2000):
                await send(request("find_value", os.urandom(20), records[i % len(records)][0]))
                if i % 20 == 0:
                    await trio.sleep(0.005)
            for i in range(2000):
                await send(os.urandom(20 + i % 200))
                if i % 50 == 0:
                    await trio.sleep(0.005)
            phases["find_value_and_junk_s"] = round(time.monotonic() - t0, 1)
            await trio.sleep(5)
            status = await trio.to_thread.run_sync(node.request, api.Status())
            nursery.cancel_scope.cancel()
        sock.close()
        log_lines = log_file.read_text().splitlines() if log_file.exists() else []
        attack_lines = log_lines[log_lines_before:]
        rss = [mb for _, mb in curve]
        dht = status.get("dht", {})
        return {
            "stores_sent": args.stores,
            "record_bytes_avg": round(record_size),
            "distinct_valid_records_offered": len(records),
            "phases_s": phases,
            "dht": dht,
            "table_bound": {"per_source": MAX_RECORDS_PER_SOURCE, "total": MAX_RECORDS},
            "stranger_sent_bytes": sent,
            "stranger_received_bytes": received,
            "rss_curve_mb": curve,
            "rss_start_mb": rss[0],
            "rss_max_mb": max(rss),
            "rss_end_mb": rss[-1],
            "log_lines_during_attack": len(attack_lines),
            "log_errors_during_attack": sum(1 for line in attack_lines if " ERROR " in line),
            "log_tracebacks_during_attack": sum(1 for line in attack_lines if "Traceback" in line),
        }
    finally:
        node.kill()
        shutil.rmtree(root, ignore_errors=True)


def _table(rows: list[tuple[str, str]]) -> str:
    lines = [
        "| measure | value |",
        "|---|---|",
        *(f"| {label} | {value} |" for label, value in rows),
    ]
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    dht = result["dht"]
    curve = result["rss_curve_mb"]
    step = max(1, len(curve) // 15)
    rows = "\n".join(f"| {t:.0f} | {mb:.0f} |" for t, mb in curve[::step])
    bound = result["table_bound"]
    table = _table(
        [
            (
                "records the node holds afterwards",
                f"{dht.get('records_held')} (bound: {bound['per_source']} per source address, "
                f"{bound['total']} in total)",
            ),
            ("STOREs refused", f"{dht.get('stores_refused')}"),
            ("node: bytes in / bytes out (UDP)", f"{dht.get('bytes_in')} / {dht.get('bytes_out')}"),
            (
                "stranger: bytes sent / received",
                f"{result['stranger_sent_bytes']} / {result['stranger_received_bytes']}",
            ),
            ("answers withheld (amplification guard)", f"{dht.get('answers_withheld')}"),
            ("malformed datagrams counted", f"{dht.get('malformed_datagrams')}"),
            (
                "node RSS at start / max / end",
                f"{result['rss_start_mb']} / {result['rss_max_mb']} / {result['rss_end_mb']} MB",
            ),
            (
                "log lines written during the attack (ERROR / tracebacks)",
                f"{result['log_lines_during_attack']} ({result['log_errors_during_attack']} / "
                f"{result['log_tracebacks_during_attack']})",
            ),
        ]
    )
    return f"""# One stranger against a node's DHT (issue 12 item 4): results

`benchmarks/attack_dht.py`: a real `dmgn-node` on 127.0.0.1 (its DHT on UDP 127.0.0.1, same
port); one stranger at {SOURCE} sends {result["stores_sent"]} STOREs (a new node id each; three in
four a valid ~{result["record_bytes_avg"]}-byte sealed record under its own key, one in four
random bytes), then 2,000 FIND_VALUEs for those keys and 2,000 junk datagrams.
Machine: {platform.machine()}, {os.cpu_count()} cores shared with other work.

{table}


RSS over the run (seconds since the node started, MB):

| t (s) | RSS (MB) |
|---|---|
{rows}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stores", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = trio.run(run, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "attack_dht.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "attack_dht.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
