"""``dmgn peers`` rows and the ``sync`` section of ``dmgn status``, from the states of the
peering, gossip and discovery actors. Part of the supervision tree's layer (it reads three
actors' status types)."""

from __future__ import annotations

import logging
import time
from typing import Any

from actors import discovery as dc
from actors import gossip as gs
from actors._counting_network import WireCounters
from actors.peering import PeeringStatus

log = logging.getLogger("dmgn.node")

__all__ = [
    "discovery_section",
    "peers_rows",
    "sync_section",
]


def _ago(wall: float | None) -> float | None:
    return None if wall is None else round(max(0.0, time.time() - wall), 1)


def peers_rows(
    peering: PeeringStatus, gossip: gs.GossipStatus, found: tuple[dc.FoundPeer, ...]
) -> list[dict[str, Any]]:
    by_peer = {p.peer_id: p for p in gossip.peers}
    rows: dict[str, dict[str, Any]] = {}
    for c in peering.connected:
        g = by_peer.get(c.peer_id)
        rows[c.device_id] = {
            "device_id": c.device_id,
            # A node that dialed us and that we did not choose is served by our storage
            # service, but holds nothing of ours: not one of our storage peers.
            "kind": "device" if c.is_device else "client" if c.found == "dialed us" else "storage",
            "found": c.found,
            "state": "connected",
            "identity": c.identity,
            "addrs": [c.address],
            "direction": c.direction,
            "sources": [],
            "latency_ms": c.latency_ms,
            "connected_s_ago": _ago(c.connected_at),
            "last_sync_s_ago": _ago(g.last_sync_at) if g else None,
            "behind_us": g.behind_us if g else None,
            "ahead_of_us": g.ahead_of_us if g else None,
            "in_sync": _in_sync(gossip, g),
            "score": g.score if g else 0,
            "reputation": peering.reputation.get(c.peer_id),
            "bytes_in": g.bytes_in if g else 0,
            "bytes_out": g.bytes_out if g else 0,
            "cut_off_reason": g.cut_off_reason if g else None,
        }
    for g in gossip.peers:
        device = g.peer_id.rsplit("/", 1)[-1]
        if device in rows or g.connected:
            continue
        rows[device] = {
            "device_id": device,
            "kind": "device" if g.is_device else "storage",
            "state": "cut off" if g.cut_off_reason else "disconnected",
            "identity": g.identity,
            "addrs": [],
            "direction": None,
            "sources": [],
            "latency_ms": None,
            "connected_s_ago": None,
            "last_sync_s_ago": None,
            "behind_us": None,
            "ahead_of_us": None,
            "in_sync": False,
            "score": g.score,
            "reputation": peering.reputation.get(g.peer_id),
            "bytes_in": 0,
            "bytes_out": 0,
            "cut_off_reason": g.cut_off_reason,
        }
    # Every address a peer is known by leads to its one row: a bootstrap or added address that
    # turned out to be a device is that device, not a second "unknown" peer (issue 13).
    device_of: dict[str, str] = {}
    for t in peering.targets:
        if t.device_id:
            for addr in (t.address, *t.addrs):
                device_of[addr] = t.device_id
    for c in peering.connected:
        device_of[c.address] = c.device_id
    for f in found:
        key = f.device_id
        if len(key) != 32:
            key = next((device_of[a] for a in f.addrs if a in device_of), key)
        row = rows.get(key)
        if row is None:
            row = rows[key] = {
                "device_id": key if len(key) == 32 else None,
                "kind": "unknown",
                "state": "discovered",
                "identity": None,
                "addrs": list(f.addrs),
                "direction": None,
                "sources": [],
                "latency_ms": None,
                "connected_s_ago": None,
                "last_sync_s_ago": None,
                "behind_us": None,
                "ahead_of_us": None,
                "in_sync": False,
                "score": 0,
                "reputation": None,
                "bytes_in": 0,
                "bytes_out": 0,
                "cut_off_reason": None,
            }
        row["sources"] = sorted(set(row["sources"]) | set(f.sources))
        for addr in f.addrs:
            if addr not in row["addrs"]:
                row["addrs"].append(addr)
    for t in peering.targets:
        row = rows.get(t.device_id or "") or rows.get(t.address)
        if row is not None:
            for addr in t.addrs or (t.address,):
                if addr not in row["addrs"]:
                    row["addrs"].append(addr)
            if t.source not in row["sources"]:
                row["sources"] = sorted({*row["sources"], t.source})
            row["failing"] = {**row.get("failing", {}), **dict(t.failing)}
            if row["state"] == "discovered" and t.failures:
                row["state"] = f"unreachable ({t.failures} tries)"
            continue
        if t.connected:
            continue
        rows[t.address] = {
            "device_id": t.device_id,
            "kind": "unknown",
            "state": f"unreachable ({t.failures} tries)" if t.failures else "dialing",
            "identity": None,
            "addrs": list(t.addrs or (t.address,)),
            "direction": None,
            "sources": [t.source],
            "latency_ms": None,
            "connected_s_ago": None,
            "last_sync_s_ago": None,
            "behind_us": None,
            "ahead_of_us": None,
            "in_sync": False,
            "failing": dict(t.failing),
            "score": 0,
            "reputation": None,
            "bytes_in": 0,
            "bytes_out": 0,
            "cut_off_reason": t.last_error,
        }
    for row in rows.values():
        row.setdefault("failing", {})
    order = {"connected": 0, "discovered": 1}
    return sorted(
        rows.values(),
        key=lambda r: (order.get(r["state"], 2), r["kind"] != "device", str(r["device_id"])),
    )


def _in_sync(gossip: gs.GossipStatus, peer: gs.PeerStatus | None) -> bool:
    """In sync only when the version vectors match: ours and the one the peer last told us.
    Counts of what each lacks are estimates from that last vector; during a partition both
    sides keep adding and the vectors differ, so neither shows "in sync"."""
    if peer is None or not peer.connected or peer.last_sync_at is None:
        return False
    ours = {d: s for d, s in gossip.vector.items() if s}
    theirs = {d: s for d, s in peer.vector.items() if s}
    return ours == theirs


def discovery_section(
    status: dc.DiscoveryStatus | None, error: str | None = None
) -> dict[str, Any]:
    """How this node finds peers (``dmgn peers`` and ``dmgn status``): mDNS interfaces, the DHT
    port and neighbours, the bootstrap results, the last error."""
    if status is None:
        return {"enabled": False, "last_error": error}
    return {
        "enabled": True,
        "announced_addrs": list(status.addrs),
        "mdns": list(status.mdns_interfaces) if status.mdns_interfaces else "off",
        "dht_port": status.dht_port,
        "dht_bound": None if status.dht_port is None else f"{status.dht_bind}:{status.dht_port}",
        "dht_neighbors": status.dht_neighbors,
        "bootstrap_peers": list(status.bootstrap),
        "dht_bootstrap": status.dht_bootstrap,
        "last_publish_s_ago": _ago(status.last_publish_at),
        "last_error": status.last_error,
    }


def sync_section(gossip: gs.GossipStatus, counters: WireCounters) -> dict[str, Any]:
    devices = []
    for p in gossip.peers:
        if not p.is_device:
            continue
        devices.append(
            {
                "device_id": p.peer_id,
                "connected": p.connected,
                "behind_us": p.behind_us if p.connected else None,
                "ahead_of_us": p.ahead_of_us if p.connected else None,
                "in_sync": _in_sync(gossip, p),
                "last_sync_s_ago": _ago(p.last_sync_at),
                "vector": {d.hex(): s for d, s in sorted(p.vector.items())},
            }
        )
    return {
        "device_id": gossip.device_id,
        "vector": {d.hex(): s for d, s in sorted(gossip.vector.items())},
        "feed_entries": gossip.entries,
        "devices": devices,
        "last_apply_error": gossip.last_apply_error,
        "wire_bytes_out": counters.bytes_out,
        "wire_bytes_in": counters.bytes_in,
    }
