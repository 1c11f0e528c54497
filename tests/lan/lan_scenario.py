"""A LAN built from network namespaces, run inside ``unshare -rnm`` by test_lan_namespaces.py.

The namespace unshare made is the switch: a bridge ``br0``; each host is an ``ip netns`` with a
veth pair (``eth0`` inside, ``veth-NAME`` on the bridge), an address on 10.77.0.0/24, loopback
up, and no default route (an offline LAN). Two devices of one identity (``dmgn init``, then
``dmgn import`` of its export) run as real ``dmgn-node`` processes with the default config
(listen on 0.0.0.0:4001, mDNS on, DHT on) but for a short ``sync_interval`` (see
``SYNC_INTERVAL``). The script prints one JSON report line and always kills its daemons and
deletes its namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from dmgn import api
from dmgn.app.control_client import call
from dmgn.paths import DataDir

sys.path.insert(0, str(Path(__file__).parents[2]))  # a script: tests/ is not on its path
from tests._deadlines import scaled

PASSPHRASE = "lan-test-passphrase"
#: For each wait on an idle machine (scaled with the load when the wait starts).
DEADLINE = 60.0
#: Our two devices' anti-entropy period (default 60 s). After a heal, each side says "in sync"
#: only once the other has told it its vector again, which nothing but the next round does when
#: the connection survived the partition: with the default the suite waited ~50 s for it.
SYNC_INTERVAL = "2s"
HOSTS = {"a": "10.77.0.11", "b": "10.77.0.12"}
#: ``--stranger``: a third host with another identity is on the LAN from the start (its mDNS
#: traffic captured with a Python socket in its namespace); once it has seen our announcements
#: and our devices converged it watches ``--watch`` more seconds (60 by hand; the suite passes
#: a few), dials each of our devices in device and storage mode, and the report says what it
#: saw of us (issue 20's must-show, asserted by test_lan_namespaces.py).
STRANGER = "--stranger" in sys.argv
STRANGER_WATCH = float(sys.argv[sys.argv.index("--watch") + 1]) if "--watch" in sys.argv else 60.0
TOOLS = Path(__file__).with_name("_stranger_tools.py")
if STRANGER:
    HOSTS["c"] = "10.77.0.13"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=scaled(60))
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")
    return done


def build_lan() -> None:
    sh("ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", "br0", "type", "bridge")
    sh("ip", "link", "set", "br0", "up")
    for name, address in HOSTS.items():
        sh("ip", "netns", "add", name)
        sh("ip", "link", "add", f"veth-{name}", "type", "veth", "peer", "name", "eth0",
           "netns", name)  # fmt: skip
        sh("ip", "link", "set", f"veth-{name}", "master", "br0", "up")
        inside = ("ip", "netns", "exec", name)
        sh(*inside, "ip", "link", "set", "lo", "up")
        sh(*inside, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
        sh(*inside, "ip", "link", "set", "eth0", "up")


def remove_lan() -> None:
    for name in HOSTS:
        sh("ip", "netns", "del", name, check=False)
    sh("ip", "link", "del", "br0", check=False)


class Device:
    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.root = root / name
        self.env = {
            **os.environ,
            "DMGN_DATA_DIR": str(self.root),
            "DMGN_PASSPHRASE": PASSPHRASE,
            "DMGN_EMBEDDER": "hashing",
            "COLUMNS": "120",
        }
        self.env.pop("DMGN_DEBUG", None)

    def cli(self, *args: str, json_out: bool = True, netns: bool = False) -> Any:
        prefix = ["ip", "netns", "exec", self.name] if netns else []
        command = [*prefix, sys.executable, "-m", "dmgn.app.cli", *args]
        if json_out:
            command.append("--json")
        done = subprocess.run(
            command, env=self.env, capture_output=True, text=True, timeout=scaled(120)
        )
        if done.returncode != 0:
            raise RuntimeError(f"{self.name}: dmgn {' '.join(args)}: {done.stderr.strip()}")
        return json.loads(done.stdout) if json_out and done.stdout.strip() else done.stdout

    def configure(self, **values: Any) -> None:
        path = self.root / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **values}, indent=2))

    def request(self, request: api.AnyRequest) -> dict[str, Any]:
        return call(DataDir(self.root), request)

    def ids(self) -> set[str]:
        results = self.request(api.QueryMemories(recent=True, limit=1000))["results"]
        return {r["id"] for r in results}

    def kill(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((self.root / "dmgn-node.pid").read_text()), signal.SIGKILL)


def start_together(devices: list[Device]) -> None:
    """``dmgn start`` on every device at once (each waits ~3 s for its daemon to answer)."""
    with ThreadPoolExecutor(len(devices)) as pool:
        for started in [pool.submit(d.cli, "start", netns=True) for d in devices]:
            started.result()


def wait_for(what: str, check: Callable[[], bool], deadline: float = DEADLINE) -> float:
    start, deadline = time.monotonic(), scaled(deadline)
    while True:
        try:
            if check():
                return round(time.monotonic() - start, 2)
        except Exception:  # a daemon still starting, a memory not there yet: poll again
            pass
        if time.monotonic() - start > deadline:
            raise AssertionError(f"not within {deadline:g}s: {what}")
        time.sleep(0.2)


def connected_devices(device: Device) -> int:
    peers = device.request(api.Peers())["peers"]
    return sum(p["kind"] == "device" and p["state"] == "connected" for p in peers)


def watch_as_stranger(c: Device, a: Device, b: Device, capture: Path) -> dict[str, Any]:
    """After the stranger has seen our announcements: watch, dial us, and look for us in
    everything it has."""
    identity = a.request(api.Status())["identity_id"]
    devices = [d.request(api.Status())["device_id"] for d in (a, b)]
    stranger_device = c.request(api.Status())["device_id"]

    def seen_announcements() -> bool:
        rows = json.dumps(c.request(api.Peers()))
        return all(d in rows for d in devices)

    report: dict[str, Any] = {"saw_announcements_s": wait_for("c sees us", seen_announcements)}
    time.sleep(STRANGER_WATCH)  # the must-show's "after a minute" (nothing to wait on)
    m5 = a.cli("add", "while a stranger watches")["id"]
    report["converge_s"] = wait_for("a and b still converge", lambda: m5 in b.ids())
    done = subprocess.run(
        ["ip", "netns", "exec", "c", sys.executable, str(TOOLS), "dial", HOSTS["c"], "4001",
         *(f"ws://{HOSTS[n]}:4001" for n in ("a", "b"))],
        capture_output=True, text=True, timeout=scaled(120),
    )  # fmt: skip
    dialed = json.loads(done.stdout.splitlines()[-1])
    packets = capture.read_bytes()
    seen = {
        "peers_json": json.dumps(c.request(api.Peers())),
        "status_json": json.dumps(c.request(api.Status())),
        "log": (c.root / "logs" / "dmgn-node.log").read_text(),
        "dht_known": json.dumps(dialed.get("dht_known")),
        "dials": json.dumps(dialed["dials"]),
    }
    hexed = {"mdns_capture": packets.hex(), "mdns_capture_raw": packets.decode("latin-1")}
    raw_identity, raw_devices = bytes.fromhex(identity), [bytes.fromhex(d) for d in devices]
    report.update(
        {
            "our_identity_in": [k for k, v in {**seen, **hexed}.items() if identity in v]
            + (["mdns_capture_bytes"] if raw_identity in packets else []),
            "identity_prefix_in": [k for k, v in {**seen, **hexed}.items() if identity[:16] in v],
            # A row, record or packet naming both our devices would pair them.
            "both_device_ids_in_one_row": [
                json.dumps(row)[:200]
                for row in c.request(api.Peers())["peers"]
                if all(d in json.dumps(row) for d in devices)
            ]
            + [
                # A packet naming every dmgn service on the LAN (a known-answer list in a
                # query, the stranger's own included) pairs nothing; one naming both of ours
                # and not the stranger would.
                f"mdns {'response' if packet[2] & 0x80 else 'query'} without the stranger"
                for packet in _packets(packets)
                if all(_names(packet, d, r) for d, r in zip(devices, raw_devices, strict=True))
                and not _names(packet, stranger_device, bytes.fromhex(stranger_device))
            ],
            "mdns_packets_naming_both_and_the_stranger": sum(
                all(_names(p, d, bytes.fromhex(d)) for d in [*devices, stranger_device])
                for p in _packets(packets)
            ),
            "connected_to_us": [
                p["device_id"] for p in c.request(api.Peers())["peers"] if p["state"] == "connected"
            ],
            "our_peers": [(p["kind"], p["state"]) for p in a.request(api.Peers())["peers"]],
            "mdns_packets": len(_packets(packets)),
            "mdns_packets_naming_a_device": sum(
                any(d.encode() in p for d in devices) for p in _packets(packets)
            ),
            "dials": dialed["dials"],
            "dht_known": dialed.get("dht_known"),
            "dht_error": dialed.get("dht_error"),
            "dht_status": c.request(api.Status())["discovery"],
            # Records its DHT node holds (its own provider record is one).
            "dht_records_held": c.request(api.Status())["dht"]["records_held"],
            "our_storage_keys": [
                r["storage"]["identity"] for r in dialed["dials"].values() if r["storage"]["ok"]
            ],
            # What it was sent while it held each storage-mode connection open; a value that
            # both our devices sent it (an owner key, a stream id, ...) would pair them.
            "storage_received": {
                address: r["storage"].get("received") for address, r in dialed["dials"].items()
            },
            "storage_held_s": [r["storage"].get("held_s") for r in dialed["dials"].values()],
            "values_both_sent": sorted(
                set.intersection(
                    *(_values(r["storage"].get("received", [])) for r in dialed["dials"].values())
                )
            ),
        }
    )
    return report


_HEX = "0123456789abcdef"


def _values(received: list[dict[str, Any]]) -> set[str]:
    """Every value in messages received that could name something (bytes fields of 8+ bytes,
    as hex; free text such as the agent string is the same everywhere and is left out), and
    the 16-hex prefix of each, flattened."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, str) and len(value) >= 16 and not value.strip(_HEX):
            found.add(value)
            found.add(value[:16])

    for message in received:
        walk({k: v for k, v in message.items() if k != "t"})
    return found


def _names(packet: bytes, device_hex: str, device: bytes) -> bool:
    return device_hex.encode() in packet or device_hex[:16].encode() in packet or device in packet


def _packets(blob: bytes) -> list[bytes]:
    out, at = [], 0
    while at + 4 <= len(blob):
        (size,) = struct.unpack(">I", blob[at : at + 4])
        out.append(blob[at + 4 : at + 4 + size])
        at += 4 + size
    return out


def main() -> None:
    report: dict[str, Any] = {}
    root = Path(tempfile.mkdtemp(prefix="dmgn-lan-"))
    a, b = Device(root, "a"), Device(root, "b")
    everyone = [a, b, Device(root, "c")] if STRANGER else [a, b]
    try:
        build_lan()
        report["routes_b"] = sh("ip", "netns", "exec", "b", "ip", "route").stdout
        capture = root / "mdns.capture"
        capturer: subprocess.Popen[str] | None = None
        if STRANGER:
            # The stranger is there first: it hears every announcement we make.
            capturer = subprocess.Popen(
                ["ip", "netns", "exec", "c", sys.executable, str(TOOLS), "capture",
                 str(capture), HOSTS["c"]],
                stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            assert capturer.stdout is not None and "capturing" in capturer.stdout.readline()
            everyone[2].cli("init")
        a.cli("init")
        backup = root / "identity.backup"
        a.cli("export", "-o", str(backup))
        b.cli("import", "-i", str(backup))
        for d in (a, b):
            d.configure(sync_interval=SYNC_INTERVAL)
        # The stranger's capture runs already: it hears every announcement any daemon makes.
        start_together(everyone)
        report["found_s"] = wait_for(
            "a and b find each other by mDNS and connect",
            lambda: connected_devices(a) == 1 and connected_devices(b) == 1,
        )
        report["identity"] = a.request(api.Status())["identity_id"]
        report["sources"] = sorted(
            {s for p in a.request(api.Peers())["peers"] for s in p.get("sources") or []}
        )
        report["node_addrs"] = {
            d.name: json.loads((d.root / "config.json").read_text()).get("node_addrs")
            for d in (a, b)
        }
        report["announced"] = {
            d.name: d.request(api.Status())["discovery"]["announced_addrs"] for d in (a, b)
        }
        m1 = a.cli("add", "laptop: the heron nests by the river")["id"]
        m2 = b.cli("add", "desktop: the kingfisher dives at dawn")["id"]
        report["converge_s"] = wait_for("adds replicate", lambda: a.ids() == b.ids() == {m1, m2})
        # A partition: b's cable out. Both keep writing.
        sh("ip", "netns", "exec", "b", "ip", "link", "set", "eth0", "down")
        m3 = a.cli("add", "during the partition, on a")["id"]
        m4 = b.cli("add", "during the partition, on b")["id"]
        report["partition_sync_a"] = a.request(api.Status())["sync"]["devices"]
        report["partition_peers_b_json"] = b.request(api.Peers())["peers"]
        report["partition_peers_a"] = a.cli("peers", json_out=False)
        report["partition_status_a"] = a.cli("status", json_out=False)
        sh("ip", "netns", "exec", "b", "ip", "link", "set", "eth0", "up")
        report["heal_s"] = wait_for(
            "the link is back: both converge", lambda: a.ids() == b.ids() == {m1, m2, m3, m4}
        )
        report["healed_in_sync"] = wait_for(
            "both say in sync",
            lambda: all(
                p["in_sync"] for d in (a, b) for p in d.request(api.Peers())["peers"]
                if p["kind"] == "device"
            ),
        )  # fmt: skip
        report["healed_peers_a"] = a.cli("peers", json_out=False)
        report["healed_status_a"] = a.cli("status", json_out=False)
        report["peers_a_json"] = a.request(api.Peers())
        if STRANGER:
            report["stranger"] = watch_as_stranger(everyone[2], a, b, capture)
            if capturer is not None:
                capturer.kill()
        report["ok"] = True
    except Exception as error:  # reported to the test, which fails with it
        report["ok"] = False
        report["error"] = f"{type(error).__name__}: {error}"
        for d in everyone:
            with contextlib.suppress(OSError):
                report[f"log_{d.name}"] = (d.root / "logs" / "dmgn-node.log").read_text()[-3000:]
    finally:
        for d in everyone:
            d.kill()
        remove_lan()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
