"""Human output for CLI responses (rich). Scripts use ``--json`` instead."""

from __future__ import annotations

import datetime as dt
from typing import Any

from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.tree import Tree

from dmgn.app.render_plain import lag as _lag
from dmgn.app.render_plain import render_status
from dmgn.app.render_plain import seconds_ago as _seconds


def when(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def render(console: Console, command: str, response: dict[str, Any]) -> None:
    renderer = _RENDERERS.get(command, _render_mapping)
    renderer(console, response)


def _render_add(console: Console, r: dict[str, Any]) -> None:
    console.print(f"[green]✓[/green] Memory added: [bold]{r['id']}[/bold]")
    for target in r.get("links", []):
        console.print(f"  linked to {target}")


def _render_import(console: Console, r: dict[str, Any]) -> None:
    rate = f" ({r['memories_per_s']:g}/s)" if r.get("memories_per_s") else ""
    console.print(
        f"[green]✓[/green] Imported {r['added']} memories from {r['file']} in "
        f"{r['seconds']:.1f} s{rate}",
        soft_wrap=True,
    )
    if r["already_present"]:
        console.print(f"  {r['already_present']} were already stored")
    if r["refused_deleted"]:
        console.print(f"  {r['refused_deleted']} were refused: deleted before")
    for problem in r["failed"]:
        console.print("[red]✗[/red] ", end="")
        console.print(problem["error"], markup=False, highlight=False, soft_wrap=True)
    if r["failed"]:
        console.print(f"  {len(r['failed'])} lines not imported (fix them and import those again)")


def _render_query(console: Console, r: dict[str, Any]) -> None:
    # A numbered list like the reference, not a table: contents stay whole and greppable at any
    # terminal width.
    results = r["results"]
    remote = [d for d in r.get("devices", []) if d["device_id"] != "local" and d["answered"]]
    if r.get("partial"):
        console.print(f"[yellow]partial answer: {r.get('partial_reason')}[/yellow]")
    if not results:
        console.print("No memories found.")
        return
    also = f" (with {len(remote)} of your other devices)" if remote else ""
    console.print(f"Found {_count(r['count'], 'memory', 'memories')}{also}:\n")
    for i, hit in enumerate(results, 1):
        text = hit.get("content", hit.get("snippet", ""))
        console.print(f"{i}. ", end="")
        console.print(text, markup=False, highlight=False, soft_wrap=True)
        # Recent memories carry no score: nothing was ranked.
        score = f" | Score: {hit['score']:.3f}" if "score" in hit else ""
        facts = f"Type: {hit['type']} | {when(hit['timestamp'])}{score}"
        line = f"   ID: {hit['memory_id']} | {facts}"
        if len(line) > console.width:  # the whole id on a line of its own, never cut
            line = f"   ID: {hit['memory_id']}\n   {facts}"
        console.print(line, style="dim", soft_wrap=True, markup=False, highlight=False)


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _render_get(console: Console, r: dict[str, Any]) -> None:
    console.print(f"[bold]{r['id']}[/bold]  {r['type']}  {when(r['timestamp'])}")
    console.print(r["content"], markup=False, highlight=False)
    for key, value in r.get("metadata", {}).items():
        console.print(f"  [dim]{key}[/dim] = {value}", markup=True, highlight=False)
    for link in r.get("links", []):
        arrow = f"→ {link['to'][:12]}" if link["from"] == r["id"] else f"← {link['from'][:12]}"
        console.print(f"  {arrow} ({link['type']}, weight {link['weight']:g})")


def _render_graph(console: Console, r: dict[str, Any]) -> None:
    nodes = {n["id"]: n for n in r["nodes"]}
    # Walk links in both directions so a root that is only linked *to* still shows its graph.
    children: dict[str, list[tuple[str, str]]] = {}
    for edge in r["edges"]:
        children.setdefault(edge["from"], []).append((edge["to"], f"{edge['type']} →"))
        children.setdefault(edge["to"], []).append((edge["from"], f"← {edge['type']}"))
    root = nodes[r["root_id"]]
    tree = Tree(f"[bold]{root['id'][:12]}[/bold] {root['type']} {when(root['timestamp'])}")
    # Every edge is drawn once. A node reached again (a cycle, or two paths to it) is drawn as
    # a reference, not a second subtree, so "N edges" below counts the lines above.
    shown = {root["id"]}
    drawn: set[int] = set()
    adjacency: dict[str, list[tuple[int, str, str]]] = {}
    for index, edge in enumerate(r["edges"]):
        adjacency.setdefault(edge["from"], []).append((index, edge["to"], f"{edge['type']} →"))
        adjacency.setdefault(edge["to"], []).append((index, edge["from"], f"← {edge['type']}"))

    def grow(branch: Tree, node_id: str) -> None:
        later: list[tuple[Tree, str]] = []
        for index, other, how in adjacency.get(node_id, []):
            target = nodes.get(other)
            if index in drawn or target is None:
                continue
            drawn.add(index)
            label = f"[dim]{how}[/dim] {target['id'][:12]} {target['type']}"
            if target["id"] in shown:
                branch.add(f"{label} [dim](also in this tree)[/dim]")
                continue
            shown.add(target["id"])
            later.append((branch.add(f"{label} {when(target['timestamp'])}"), target["id"]))
        for child, child_id in later:
            grow(child, child_id)

    grow(tree, root["id"])
    console.print(tree)
    console.print(
        f"{_count(len(nodes), 'node', 'nodes')}, {_count(len(r['edges']), 'edge', 'edges')} "
        f"(depth {r['depth']})"
    )


def _render_delete(console: Console, r: dict[str, Any]) -> None:
    state = "deleted" if r["deleted"] else "already deleted"
    console.print(f"[green]✓[/green] Memory {r['id'][:12]} {state}")


def _render_link(console: Console, r: dict[str, Any]) -> None:
    state = "linked" if r["created"] else "link already existed (weight updated)"
    console.print(
        f"[green]✓[/green] {r['from_id'][:12]} → {r['to_id'][:12]} ({r['edge_type']}): {state}"
    )


def _render_peers(console: Console, r: dict[str, Any]) -> None:
    _render_peer_rows(console, r["peers"], running="discovery" in r)
    for peer in r["peers"]:
        for address, why in (peer.get("failing") or {}).items():
            console.print(f"[yellow]failing[/yellow] {address}: {why}", highlight=False)
    discovery = r.get("discovery")
    if discovery:
        console.print()
        console.print("[bold]discovery[/bold]")
        _render_mapping(console, discovery)


def _render_peer_rows(console: Console, peers: list[dict[str, Any]], *, running: bool) -> None:
    if not peers:
        # Only a running daemon has a discovery section: say the right thing to each.
        console.print(
            "No peers yet: they come from bootstrap_peers in config.json, the LAN (mDNS) and "
            "the DHT, and show here as they connect."
            if running
            else "No peers: the daemon is not running (`dmgn start`); peers come from "
            "bootstrap_peers in config.json, the LAN and the DHT."
        )
        return
    if console.width < WIDE_PEERS:
        _render_peers_narrow(console, peers)
        return
    table = Table()
    for column in (
        "device",
        "kind",
        "state",
        "address",
        "found by",
        "latency",
        "last sync",
        "sync",
        "score",
    ):
        table.add_column(column, overflow="fold")
    for peer in peers:
        facts = _peer_facts(peer)
        table.add_row(
            facts["device"],
            peer["kind"],
            peer["state"],
            "\n".join(peer.get("addrs") or []) or "-",
            facts["found by"],
            facts["latency"],
            facts["last sync"],
            facts["sync"],
            facts["score"],
        )
    console.print(table)
    for peer in peers:
        if peer.get("cut_off_reason"):
            console.print(
                f"[dim]{(peer.get('device_id') or '?')[:12]}: {peer['cut_off_reason']}[/dim]",
                highlight=False,
            )


#: Below this many columns the peers table would cut words into fragments ("storag/e"); each
#: peer then gets a few lines of its own instead.
WIDE_PEERS = 120


def _peer_facts(peer: dict[str, Any]) -> dict[str, str]:
    latency = peer.get("latency_ms")
    return {
        "device": (peer.get("device_id") or "?")[:12],
        "found by": _found_by(peer),
        "latency": "-" if latency is None else f"{latency:.1f} ms",
        "last sync": _seconds(peer.get("last_sync_s_ago")),
        "sync": _lag(peer.get("behind_us"), peer.get("ahead_of_us"), peer.get("in_sync"))
        if peer["kind"] == "device"
        else "-",
        # The reputation score (0-100, docs/sync.md) when the peer has one.
        "score": str(
            peer["reputation"]["score"] if peer.get("reputation") else peer.get("score", 0)
        ),
    }


def _found_by(peer: dict[str, Any]) -> str:
    """Discovery's sources, or for another identity's node how we came to it (bootstrap, peer
    exchange, or it dialed us: a client we serve, not one of our storage peers)."""
    found = peer.get("found")
    sources = list(peer.get("sources") or [])
    if found and found != "device" and found not in sources:
        sources.insert(0, found)
    return ", ".join(sources) or (peer.get("direction") or "-")


def _render_peers_narrow(console: Console, peers: list[dict[str, Any]]) -> None:
    for number, peer in enumerate(peers):
        facts = _peer_facts(peer)
        if number:
            console.print()
        sync = f" · {facts['sync']}" if facts["sync"] != "-" else ""
        console.print(
            f"[bold]{facts['device']}[/bold]  {peer['kind']} · {peer['state']}{sync}",
            highlight=False,
        )
        for address in peer.get("addrs") or ["-"]:
            console.print(f"  address    {address}", highlight=False, soft_wrap=True)
        console.print(
            f"  found by   {facts['found by']}   latency {facts['latency']}   "
            f"last sync {facts['last sync']}   score {facts['score']}",
            highlight=False,
        )
        if peer.get("cut_off_reason"):
            console.print(f"  [dim]cut off: {peer['cut_off_reason']}[/dim]", highlight=False)


def _render_status(console: Console, r: dict[str, Any]) -> None:
    # Without rich (dmgn.app.render_plain): `dmgn status` prints the same offline and through
    # the daemon, where it must not pay for importing rich.
    render_status(r, console.file)


def _render_mapping(console: Console, r: dict[str, Any]) -> None:
    """Key/value rows; a nested mapping (status "index", "dht"...) is a section of its own,
    indented, with its own key width: long nested keys must not push a 64-character identity
    past 80 columns."""
    width = max((len(key) for key, value in r.items() if not isinstance(value, dict)), default=0)
    rows: list[tuple[str, str]] = []

    def flush() -> None:
        if rows:
            console.print(_key_values(rows, width))
            rows.clear()

    for key, value in r.items():
        if isinstance(value, dict):
            flush()
            console.print(f"[bold]{key}[/bold]", highlight=False)
            inner = [(name, _plain(item)) for name, item in value.items()]
            console.print(Padding(_key_values(inner, 0), (0, 0, 0, 2)))
        else:
            rows.append((key, _plain(value)))
    flush()


def _key_values(rows: list[tuple[str, str]], key_width: int) -> Table:
    # No edge padding: a 64-character identity next to a 12-character key fits 80 columns.
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold", min_width=key_width)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    return table


def _plain(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    return "-" if value is None else str(value)


_RENDERERS = {
    "add": _render_add,
    "import": _render_import,
    "query": _render_query,
    "get": _render_get,
    "graph": _render_graph,
    "delete": _render_delete,
    "link": _render_link,
    "peers": _render_peers,
    "status": _render_status,
}
