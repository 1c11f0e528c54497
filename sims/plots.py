"""PNG plots of a run's metrics document (matplotlib, headless).

Every plot has a title, axes with units, and the run's fault events marked on its time axis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    import matplotlib
except ImportError as missing:  # a plain install: the simulations run, the plots need an extra
    raise ImportError(
        "sims draws PNG plots with matplotlib, which a plain install lacks: "
        "pip install -e '.[sims]' (or '.[dev]')"
    ) from missing

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

_EVENT_COLOURS = {
    "partition": "tab:red",
    "heal": "tab:green",
    "churn": "tab:orange",
    "churn_end": "tab:olive",
    "lose_device": "tab:purple",
    "restore": "tab:blue",
    "never_together": "tab:brown",
    "never_together_end": "tab:olive",
    "malicious": "tab:red",
    "malicious_end": "tab:pink",
    "workload_end": "black",
}


def _mark_events(ax: Axes, document: dict[str, Any]) -> None:
    for event in document["events"]:
        if event["kind"] == "start":
            continue
        colour = _EVENT_COLOURS.get(event["kind"], "grey")
        ax.axvline(event["t_min"], color=colour, linestyle="--", linewidth=1)
        ax.annotate(
            event["kind"].replace("_", " "),
            (event["t_min"], 1.0),
            xycoords=("data", "axes fraction"),
            rotation=90,
            va="top",
            ha="right",
            fontsize=7,
            color=colour,
        )


def _save(fig: Figure, document: dict[str, Any], path: Path) -> Path:
    """Every plot's ending: the run's title above it, laid out, written, and closed."""
    fig.suptitle(_title(document), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _title(document: dict[str, Any]) -> str:
    p = document["params"]
    return (
        f"{document['scenario']}: {p['nodes']} nodes ({p['identities']} identities × "
        f"{p['devices_per_identity']} devices + {p['storage_nodes']} storage), "
        f"seed {document['seed']}"
    )


def plot_run(document: dict[str, Any], resources: dict[str, Any], out: Path) -> list[Path]:
    written = [
        _convergence_cdf(document, out / "convergence_cdf.png"),
        _messages_per_op(document, out / "messages_per_op.png"),
        _shards(document, out / "shards.png"),
        _traffic(document, resources, out / "traffic.png"),
    ]
    if document.get("restores"):
        written.append(_restores(document, out / "restore.png"))
    if document.get("never_together"):
        written.append(_apart(document, out / "never_together.png"))
    if document.get("malicious"):
        written.append(_malicious(document, out / "malicious.png"))
    return written


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _malicious(document: dict[str, Any], path: Path) -> Path:
    """Each attack of the malicious nodes over time (rejected or not), and the totals."""
    m = document["malicious"]
    attacks = m["attacks"]
    kinds = sorted(k for k in attacks["by_kind"] if k != "flood_sessions")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5))
    for row, kind in enumerate(kinds):
        times = [t for t, k, _ok in attacks["timeline"] if k == kind]
        bad = [t for t, k, ok in attacks["timeline"] if k == kind and not ok]
        top.scatter(times, [row] * len(times), marker="o", color="tab:green", s=18)
        top.scatter(bad, [row] * len(bad), marker="x", color="tab:red", s=40)
    top.set_yticks(range(len(kinds)), [k.replace("_", " ") for k in kinds], fontsize=7)
    top.set_ylim(-0.5, len(kinds) - 0.5)
    top.set_xlim(0, document["params"]["minutes"] + 0.5)
    top.set_xlabel("virtual time (minutes); o: rejected by the honest node, x: not rejected")
    _mark_events(top, document)
    top.set_title("Attacks by the malicious storage nodes", fontsize=10)
    by_kind = attacks["by_kind"]
    labels = [*kinds, "flood_sessions"] if "flood_sessions" in by_kind else kinds
    xs = range(len(labels))
    sent = [by_kind[k]["sent"] for k in labels]
    rejected = [by_kind[k]["rejected"] for k in labels]
    bottom.bar([x - 0.2 for x in xs], sent, width=0.4, color="tab:grey", label="sent")
    bars = bottom.bar(
        [x + 0.2 for x in xs],
        rejected,
        width=0.4,
        color="tab:green",
        label="rejected (connection closed by the honest node)",
    )
    bottom.bar_label(bars, fontsize=7)
    bottom.set_xticks(
        list(xs), [k.replace("_", " ") for k in labels], fontsize=7, rotation=12, ha="right"
    )
    bottom.set_ylabel("attacks (count)")
    bottom.legend(fontsize="small")
    honest = m["honest_side"]
    bottom.set_title(
        f"{m['corrupt_objects_served']} corrupt shards and {m['forged_mail_items_served']} forged "
        f"mailbox items served; {honest['keepers_scoring_bad_storage_down']} keepers scored the "
        f"nodes down (lowest {honest['lowest_keeper_score_of_bad_storage']});\nrestore success "
        f"{_share(document['restore_success'])}; flood sessions beyond the limit refused",
        fontsize=8,
    )
    return _save(fig, document, path)


def _restores(document: dict[str, Any], path: Path) -> Path:
    """Each new device's restore from the storage nodes: memories wanted and restored."""
    restores = document["restores"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ts = [r["t_min"] for r in restores]
    ax.bar(
        ts,
        [r["wanted"] for r in restores],
        width=0.25,
        color="none",
        edgecolor="black",
        label="live memories the lost device held (wanted)",
    )
    ax.bar(
        ts,
        [r["restored"] for r in restores],
        width=0.18,
        color="tab:green",
        label="restored from storage nodes alone",
    )
    ax.set_xlabel("virtual time (minutes)")
    ax.set_ylabel("memories")
    ax.set_xlim(0, max([*ts, document["params"]["minutes"]]) + 0.5)
    ax.legend(fontsize="small", loc="lower right")
    _mark_events(ax, document)
    wanted = sum(r["wanted"] for r in restores)
    restored = sum(r["restored"] for r in restores)
    slowest = max(r["virtual_s"] for r in restores)
    share = f"{restored / wanted:.0%}" if wanted else "n/a"
    ax.set_title(
        f"Restore from the network: {share} ({restored} of {wanted} memories, "
        f"{len(restores)} devices; slowest {slowest:.1f} virtual s)"
    )
    return _save(fig, document, path)


def _apart(document: dict[str, Any], path: Path) -> Path:
    """Per op: when it was made and how long until every device held it, with the windows in
    which an identity's devices were never online together shaded."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for window in document["never_together"]:
        ax.axvspan(window["from_min"], window["until_min"], color="tab:brown", alpha=0.1)
    rows = document["convergence_s"]["timeline"]
    done = [(t, d) for t, _kind, d in rows if d is not None]
    ax.scatter([t for t, _ in done], [d for _, d in done], s=12, label="op (add/delete)")
    never = [t for t, _kind, d in rows if d is None]
    if never:
        ax.scatter(never, [0] * len(never), marker="x", color="tab:red", label="never converged")
    ax.set_xlabel("virtual time the op was made (minutes)")
    ax.set_ylabel("seconds until every device holds it")
    ax.legend(fontsize="small", loc="upper right")
    _mark_events(ax, document)
    due = sum(w["ops_due"] for w in document["never_together"])
    apart = sum(w["ops_converged_apart"] for w in document["never_together"])
    direct = sum(w["device_to_device_messages"] for w in document["never_together"])
    ax.set_title(
        f"Devices never online together (shaded): {apart} of {due} ops converged apart, "
        f"{direct} device-to-device messages",
        fontsize=10,
    )
    return _save(fig, document, path)


def _convergence_cdf(document: dict[str, Any], path: Path) -> Path:
    delays = document["convergence_s"]["per_op"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if delays:
        ys = [(i + 1) / len(delays) for i in range(len(delays))]
        ax.step(delays, ys, where="post")
    ax.set_xlabel(
        "virtual seconds from an op (add/delete) to every device of its identity holding it"
    )
    ax.set_ylabel("share of ops (CDF)")
    ax.set_ylim(0, 1.02)
    unconverged = document["convergence_s"]["unconverged"]
    ax.set_title(f"Convergence time per op ({len(delays)} ops, {unconverged} never converged)")
    return _save(fig, document, path)


def _messages_per_op(document: dict[str, Any], path: Path) -> Path:
    g = document["gossip"]
    d = document["params"]["devices_per_identity"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    labels = [
        "gossip payload\n(gossip.ops)",
        "anti-entropy\n(vector + want)",
        "every wire frame\n(+ Noise, keepalives)",
    ]
    values = [
        g["messages_per_op"] or 0,
        g.get("anti_entropy_messages_per_op") or 0,
        g.get("wire_messages_per_op") or 0,
    ]
    bars = ax.bar(labels, values, color=["tab:blue", "tab:cyan", "tab:purple"])
    ax.bar_label(bars, fmt="%.2f")
    flood, goal = g["flooding_messages_per_op"], g["limit_messages_per_op"]
    ax.axhline(flood, color="tab:grey", linestyle="--", label=f"flooding: d × (d − 1) = {flood}")
    ax.axhline(goal, color="tab:green", linestyle=":", linewidth=2, label=f"goal: 2 × d = {goal}")
    ax.set_ylabel("messages between one identity's devices, per op")
    ax.legend(fontsize="small", loc="upper left")
    ax.set_title(f"Messages per op (adds, links, deletes), d = {d} devices per identity")
    ax.set_xlabel(f"{g['bytes_per_op'] or 0:.0f} wire bytes between devices per op")
    return _save(fig, document, path)


def _shards(document: dict[str, Any], path: Path) -> Path:
    samples = document["samples"]
    ts = [s["t_min"] for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot(ts, [s["memories_placed"] for s in samples], label="memories with placements")
    top.plot(ts, [s["durable"] for s in samples], label="durable (>= k live shards)")
    top.plot(ts, [s["lost"] for s in samples], label="lost (< k live shards)", color="tab:red")
    top.plot(ts, [s["unplaced"] for s in samples], label="waiting for placement", linestyle=":")
    top.set_ylabel("memories")
    top.legend(fontsize="small")
    top.set_title("Shard availability (as each identity's first reachable device sees it)")
    _mark_events(top, document)
    repair = [s["repair_bytes"] for s in samples]
    deltas = [max(0, b - a) / 1024 for a, b in zip([0, *repair], repair, strict=False)]
    bottom.bar(ts, deltas, width=0.8, color="tab:orange")
    bottom.set_ylabel("repair traffic (KiB per sample)")
    bottom.set_xlabel("virtual time (minutes)")
    _mark_events(bottom, document)
    return _save(fig, document, path)


def _traffic(document: dict[str, Any], resources: dict[str, Any], path: Path) -> Path:
    samples = document["samples"]
    ts = [s["t_min"] for s in samples]
    fig, ax = plt.subplots(figsize=(8, 4))
    kib = [s["wire_bytes"] / 1024 for s in samples]
    ax.plot(ts, kib, label="wire bytes, all links (KiB, cumulative)")
    ax.set_ylabel("KiB sent (cumulative)")
    ax.set_xlabel("virtual time (minutes)")
    offline = ax.twinx()
    offline.plot(ts, [s["offline_nodes"] for s in samples], color="tab:orange", label="offline")
    offline.set_ylabel("nodes offline", color="tab:orange")
    _mark_events(ax, document)
    ax.set_title(
        f"Traffic and churn; run took {resources['real_seconds']:.0f} s real, "
        f"{resources['cpu_seconds']:.0f} s CPU, peak {resources['peak_rss_mib']:.0f} MiB"
    )
    return _save(fig, document, path)
