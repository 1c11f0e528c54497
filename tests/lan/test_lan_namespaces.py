"""Two devices of one identity on a LAN with no default route, default config (mDNS on,
0.0.0.0): they find each other by mDNS and converge, neither advertises 127.0.0.1, and a link
down/up heals; a stranger of another identity on the same LAN learns nothing that names our
identity or pairs our devices, even when it dials us (issue 20). The LAN is network
namespaces (see lan_scenario.py) inside a user + mount namespace of our own, so nothing leaves
it and nothing outlives the test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests._deadlines import scaled

pytestmark = pytest.mark.slow

SCENARIO = Path(__file__).with_name("lan_scenario.py")
#: unshare -r: root in a user namespace of our own; -n: its network; -m: its mounts, so `ip
#: netns` can keep its handles on a private /run.
ENTER = 'mount -t tmpfs tmpfs /run && exec "$0" "$@"'
#: A stranger on the LAN from the start; it watches 2 s after it saw us (a minute by hand).
STRANGER = ("--stranger", "--watch", "2")


def _namespace_problem() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare(1) and ip(8) to build a LAN from network namespaces"
    probe = subprocess.run(
        ["unshare", "-rnm", "sh", "-c", "mount -t tmpfs tmpfs /run && ip netns add probe"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"cannot create network namespaces here: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def lan() -> dict[str, Any]:
    problem = _namespace_problem()
    if problem is not None:
        pytest.skip(problem)
    done = subprocess.run(
        ["unshare", "-rnm", "sh", "-c", ENTER, sys.executable, str(SCENARIO), *STRANGER],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    assert report["ok"], json.dumps(report, indent=1)[-6000:]
    return report


def test_devices_find_each_other_by_mdns_without_a_default_route(lan: dict[str, Any]) -> None:
    assert "default" not in lan["routes_b"]
    assert "mdns" in lan["sources"]
    assert lan["found_s"] < scaled(60) and lan["converge_s"] < scaled(60)


def test_neither_advertises_loopback(lan: dict[str, Any]) -> None:
    assert lan["node_addrs"] == {"a": ["ws://10.77.0.11:4001"], "b": ["ws://10.77.0.12:4001"]}
    assert lan["announced"] == lan["node_addrs"]


def test_a_partition_is_not_in_sync_and_a_link_down_up_heals(lan: dict[str, Any]) -> None:
    assert not any(d["in_sync"] for d in lan["partition_sync_a"])
    assert "in sync" in lan["healed_peers_a"]
    assert lan["heal_s"] < scaled(60)
    rows = lan["peers_a_json"]["peers"]
    (row,) = [p for p in rows if p["kind"] == "device"]
    assert len({p["device_id"] for p in rows}) == len(rows)  # one row per peer
    # b's listen address; when the connection that won is b's dial to a (both dial at once,
    # the smaller Noise key's wins: either way round), also the address it came from.
    listen = "ws://10.77.0.12:4001"
    assert listen in row["addrs"]
    others = [addr for addr in row["addrs"] if addr != listen]
    if row["direction"] == "outbound":
        assert others == []
    else:
        assert len(others) <= 1 and all(addr.startswith("ws://10.77.0.12:") for addr in others)


def test_a_stranger_on_the_lan_learns_no_identity_and_pairs_no_devices(
    lan: dict[str, Any],
) -> None:
    seen = lan["stranger"]
    # Its peers --json, status --json, log, DHT table, our answers to its dials, and every
    # mDNS packet it captured: neither our identity key nor its 16-hex prefix...
    assert seen["our_identity_in"] == [] and seen["identity_prefix_in"] == []
    # ...nothing naming both our devices (and not every dmgn service on the LAN)...
    assert seen["both_device_ids_in_one_row"] == []
    # ...though it did hear us, and our devices still converge.
    assert seen["mdns_packets_naming_a_device"] > 0
    assert seen["converge_s"] < scaled(60) and seen["connected_to_us"] == []
    for modes in seen["dials"].values():
        # Device mode: refused without a certificate; storage mode: only a storage key.
        assert not modes["device"]["ok"] and "different identity" in modes["device"]["error"]
        assert modes["storage"]["ok"] and modes["storage"]["identity"] != lan["identity"]
    assert len(set(seen["our_storage_keys"])) == 2
    # It held each storage-mode connection open and read what came: nothing from our two
    # devices shares a value (owner key, stream ids, identity key or its prefix).
    assert all(got is not None for got in seen["storage_received"].values())
    assert seen["values_both_sent"] == [], seen["storage_received"]
    # Its DHT node knows no node of ours and holds only its own record.
    assert all(ip == "10.77.0.13" for _, ip, _ in seen["dht_known"])
    assert seen["dht_records_held"] <= 1
