"""The scenario engine: identities × devices × storage nodes, a workload, a fault schedule.

A scenario is a small TOML file in ``sims/scenarios/`` (see :class:`Scenario` for its fields).
:func:`run` builds the nodes (the production actors, see :mod:`sims.devices`) on one
:class:`~sims.network.SimNetwork`, runs the workload minute by minute in virtual time, applies
the faults, then brings every node back online and waits for convergence. It returns the
metrics document (deterministic for a seed: only virtual time and counts, no real time).
"""

from __future__ import annotations

import hashlib
import random
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import trio

from actors import storage as sg
from actors import store as st
from actors import vault as vt
from actors.node import Networking, RunningNode
from actors.peering import PeeringState
from actors.runtime import call, expect
from dmgn import api
from dmgn.shards import ShardKeys
from sims import checks, malicious
from sims.devices import SimDisk, device_id_for, sim_device
from sims.network import SimNetwork

SCENARIO_DIR = Path(__file__).parent / "scenarios"

#: Virtual seconds between convergence samples (per-op convergence times are this precise).
SAMPLE_EVERY = 5.0
#: After the workload: how long every node may take to converge before the run reports failure.
SETTLE_DEADLINE = 1800.0

TOPICS = (
    "the tea Alice likes",
    "the Rust borrow checker",
    "a trip to Lisbon",
    "the quarterly budget",
    "a bug in the parser",
    "Bob's new address",
)


@dataclass(frozen=True)
class Fault:
    kind: str  # partition | churn | lose_device | never_together | malicious | restart_storage
    at_min: float
    until_min: float
    #: churn: share of nodes offline at any time; lose_device: share of identities losing one;
    #: malicious: share of the storage nodes that turn bad (at least one); restart_storage:
    #: share of the storage nodes stopped at ``at_min`` and started again at ``until_min``
    #: (at least one).
    fraction: float = 0.3
    #: churn: mean minutes a node stays offline; never_together: minutes per turn;
    #: malicious: minutes between attack rounds.
    period_min: float = 5.0


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    identities: int = 2
    devices_per_identity: int = 3
    storage_nodes: int = 0
    minutes: float = 10.0
    #: Per identity per virtual minute (fractions are probabilities).
    adds_per_min: float = 1.0
    links_per_min: float = 0.2
    deletes_per_min: float = 0.1
    queries_per_min: float = 0.5
    latency_ms: float = 30.0
    jitter_ms: float = 10.0
    sync_interval_s: float = 30.0
    #: Longest wait before a node dials an unreachable peer again (production: 5 s; the small
    #: scenarios redial every second to converge sooner).
    redial_interval_s: float = 1.0
    #: Bootstrap addresses each node is given (at most two, as a person would): a device's
    #: first device gets that many storage nodes, each further device its first device and
    #: one storage node. Every other storage peer is found (peer exchange).
    bootstrap_addresses: int = 2
    faults: tuple[Fault, ...] = ()

    @property
    def nodes(self) -> int:
        return self.identities * self.devices_per_identity + self.storage_nodes

    def scaled(self, nodes: int) -> Scenario:
        """The same scenario with ``nodes`` nodes in total: more identities, storage nodes in
        the same proportion."""
        share = self.storage_nodes / self.nodes
        storage = round(nodes * share) if self.storage_nodes else 0
        identities = max(1, (nodes - storage) // self.devices_per_identity)
        return _replace(self, identities=identities, storage_nodes=storage)


def _replace(scenario: Scenario, **changes: Any) -> Scenario:
    values = {f.name: getattr(scenario, f.name) for f in fields(scenario)}
    return Scenario(**{**values, **changes})


def load(name_or_path: str) -> Scenario:
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIO_DIR / f"{name_or_path}.toml"
    if not path.exists():
        known = ", ".join(available())
        raise SystemExit(f"no scenario {name_or_path!r}: use one of {known} or a .toml file path")
    data = tomllib.loads(path.read_text())
    faults = tuple(Fault(**f) for f in data.pop("faults", []))
    known_fields = {f.name for f in fields(Scenario)}
    unknown = set(data) - known_fields
    if unknown:
        raise SystemExit(f"{path}: unknown fields {sorted(unknown)}; known: {sorted(known_fields)}")
    return Scenario(faults=faults, **data)


def available() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


# -- nodes --------------------------------------------------------------------------------------


@dataclass
class SimNode:
    name: str
    identity: int  # -1: a storage node
    seed: bytes
    node: RunningNode | None = None
    online: Networking | None = None
    stop: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    lost: bool = False
    #: A malicious storage node (sims.malicious): its holdings do not count as durable.
    malicious: bool = False
    #: Its data dir: a restart (the restart_storage fault) starts new actors on the same rows.
    disk: SimDisk = field(default_factory=SimDisk)
    bootstrap: tuple[str, ...] = ()
    #: Virtual minute it (last) started.
    started_min: float = 0.0

    async def inventory(self) -> st.StoreInventory:
        assert self.node is not None
        return await expect(await call(self.node.store, st.Inventory))

    async def ids(self) -> frozenset[str]:
        assert self.node is not None
        return await expect(await call(self.node.store, st.Ids))


async def _start(
    nursery: trio.Nursery, sim: SimNetwork, node: SimNode, bootstrap: tuple[str, ...], sc: Scenario
) -> None:
    node.bootstrap = bootstrap
    node.started_min = round(trio.current_time() / 60.0, 3)

    async def serve(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with sim_device(
            sim,
            node.name,
            node.seed,
            bootstrap=bootstrap,
            sync_interval=sc.sync_interval_s,
            redial_interval=sc.redial_interval_s,
            disk=node.disk,
        ) as device:
            node.node, node.online = device.node, device.online
            task_status.started()
            await node.stop.wait()
        node.done.set()

    await nursery.start(serve)


# -- the run ------------------------------------------------------------------------------------


@dataclass
class _Op:
    identity: int
    kind: str
    memory_id: str
    at: float
    converged_at: float | None = None


@dataclass
class _Run:
    sc: Scenario
    seed: int
    sim: SimNetwork
    rng: random.Random
    devices: dict[int, list[SimNode]] = field(default_factory=dict)
    storage: list[SimNode] = field(default_factory=list)
    ops: list[_Op] = field(default_factory=list)
    created: dict[int, list[str]] = field(default_factory=dict)
    deleted: dict[int, set[str]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    restores: list[dict[str, Any]] = field(default_factory=list)
    lost_devices: list[tuple[int, SimNode]] = field(default_factory=list)
    #: never_together windows: ops due to converge while apart, and wire traffic between devices.
    apart: list[dict[str, Any]] = field(default_factory=list)
    #: The nursery the nodes run in (a replacement device starts there: not in the workload's,
    #: which would then wait for it to stop).
    nursery: trio.Nursery | None = None
    attackers: list[malicious.Attacker] = field(default_factory=list)
    corrupt: list[malicious.CorruptTables] = field(default_factory=list)
    #: restart_storage: each restarted storage node, what it held as it stopped and as it
    #: started again.
    storage_restarts: list[dict[str, Any]] = field(default_factory=list)
    #: Device name -> virtual minutes from its start to its first durable memory (as sampled).
    first_durable: dict[str, float] = field(default_factory=dict)

    def minute(self) -> float:
        return round(trio.current_time() / 60.0, 3)

    def event(self, kind: str, detail: str) -> None:
        self.events.append({"t_min": self.minute(), "kind": kind, "detail": detail})

    def all_nodes(self) -> list[SimNode]:
        return [n for ds in self.devices.values() for n in ds] + self.storage


@asynccontextmanager
async def _nodes(run: _Run) -> AsyncIterator[trio.Nursery]:
    sc, rng = run.sc, run.rng
    async with trio.open_nursery() as nursery:
        storage_names = [f"storage-{i}" for i in range(sc.storage_nodes)]
        for i, name in enumerate(storage_names):
            node = SimNode(name, -1, _seed(run.seed, name))
            run.storage.append(node)
            # Each storage node dials the one before it (a chain, one storage link each way):
            # all of them dialing storage-0 filled its 128 connections at 500 nodes (124
            # storage nodes and ~24 devices), and the refused ones redialed all run long
            # (9,440 handshakes and 20,638 refused dials in the 500-node hour).
            previous = (f"mem://{storage_names[i - 1]}",) if i else ()
            await _start(nursery, run.sim, node, previous, sc)
        for ident in range(sc.identities):
            seed = _seed(run.seed, f"identity-{ident}")
            run.devices[ident] = []
            run.created[ident] = []
            run.deleted[ident] = set()
            for d in range(sc.devices_per_identity):
                name = f"id{ident}-dev{d}"
                own = [f"id{ident}-dev0"] if d else []
                wanted = max(0, min(sc.bootstrap_addresses, 2) - len(own))
                peers = rng.sample(storage_names, min(wanted, len(storage_names)))
                bootstrap = tuple(f"mem://{p}" for p in own + peers)
                node = SimNode(name, ident, seed)
                run.devices[ident].append(node)
                await _start(nursery, run.sim, node, bootstrap, sc)
        try:
            yield nursery
        finally:
            for node in run.all_nodes():
                node.stop.set()


def _seed(seed: int, name: str) -> bytes:
    return hashlib.sha256(f"sims seed {seed} {name}".encode()).digest()


async def _workload_for(run: _Run, ident: int, rng: random.Random) -> None:
    sc = run.sc
    for _minute in range(int(sc.minutes)):
        start = trio.current_time()
        plan: list[tuple[float, str]] = []
        for kind, rate in (
            ("add", sc.adds_per_min),
            ("link", sc.links_per_min),
            ("delete", sc.deletes_per_min),
            ("query", sc.queries_per_min),
        ):
            count = int(rate) + (1 if rng.random() < rate - int(rate) else 0)
            plan.extend((rng.uniform(0, 60), kind) for _ in range(count))
        for offset, kind in sorted(plan):
            await trio.sleep_until(start + offset)
            await _one_op(run, ident, kind, rng)
        await trio.sleep_until(start + 60.0)


async def _one_op(run: _Run, ident: int, kind: str, rng: random.Random) -> None:
    candidates = [d for d in run.devices[ident] if not d.lost and d.node is not None]
    online = [d for d in candidates if run.sim.is_online(d.name)]
    device = rng.choice(online or candidates)
    assert device.node is not None
    # Links and deletes pick among the memories this device holds (a memory made on a device
    # across a partition is not there yet).
    held = await device.ids()
    live = [m for m in run.created[ident] if m not in run.deleted[ident] and m in held]
    now = trio.current_time()
    if kind == "add":
        text = f"identity {ident} note {len(run.created[ident])}: {rng.choice(TOPICS)}"
        response = await device.node.request(api.AddMemory(content=text))
        run.created[ident].append(response["id"])
        run.ops.append(_Op(ident, "add", response["id"], now))
    elif kind == "link" and len(live) >= 2:
        a, b = rng.sample(live, 2)
        await device.node.request(api.LinkMemories(from_id=a, to_id=b))
        run.ops.append(_Op(ident, "link", f"{a}>{b}", now))
    elif kind == "delete" and live:
        victim = rng.choice(live)
        await device.node.request(api.DeleteMemory(id=victim))
        run.deleted[ident].add(victim)
        run.ops.append(_Op(ident, "delete", victim, now))
    elif kind == "query":
        await device.node.request(api.QueryMemories(text=rng.choice(TOPICS), limit=5))


async def _sampler(run: _Run) -> None:
    """Every SAMPLE_EVERY virtual seconds: which ops every device of their identity holds."""
    while True:
        await trio.sleep(SAMPLE_EVERY)
        await _sample(run)


async def _sample(run: _Run) -> None:
    now = trio.current_time()
    pending = [op for op in run.ops if op.converged_at is None and op.kind != "link"]
    idents = sorted({op.identity for op in pending})
    held: dict[int, list[frozenset[str]]] = {}
    for ident in idents:
        held[ident] = [await d.ids() for d in run.devices[ident] if not d.lost and d.node]
    for op in pending:
        sets = held[op.identity]
        if op.kind == "add":
            ok = all(op.memory_id in s for s in sets) or op.memory_id in run.deleted[op.identity]
        else:
            ok = all(op.memory_id not in s for s in sets)
        if ok:
            op.converged_at = now


async def _shard_sampler(run: _Run, every: float = 60.0) -> None:
    while True:
        await _shard_sample(run)
        await trio.sleep(every)


async def _shard_sample(run: _Run) -> None:
    """Shard availability as each identity's first reachable device sees it; and how many
    storage peers every online device has (found, not handed: at most two bootstrap
    addresses each), and when each device first had a durable memory."""
    memories = durable = lost = repair = unplaced = 0
    peers: list[int] = []
    for _ident, devices in run.devices.items():
        first = True
        for device in devices:
            if device.online is None or device.lost or not run.sim.is_online(device.name):
                continue
            d = await device.online.durability()
            peers.append(d.storage_peers)
            if d.durable and device.name not in run.first_durable:
                run.first_durable[device.name] = run.minute() - device.started_min
            if first:
                memories += d.memories
                durable += d.durable
                lost += d.lost
                unplaced += d.unplaced
                repair += d.repair_bytes
                first = False
    peers.sort()
    total = run.sim.total()
    run.samples.append(
        {
            "t_min": run.minute(),
            "memories_placed": memories,
            "durable": durable,
            "lost": lost,
            "unplaced": unplaced,
            "repair_bytes": repair,
            "wire_messages": total.messages,
            "wire_bytes": total.bytes,
            "connections_opened": sum(run.sim.opened.values()),
            "offline_nodes": len(run.sim._offline),
            "storage_peers_min": peers[0] if peers else 0,
            "storage_peers_median": peers[len(peers) // 2] if peers else 0,
        }
    )


async def _faults(run: _Run, nursery: trio.Nursery) -> None:
    for fault in run.sc.faults:
        nursery.start_soon(_fault, run, fault, nursery)


async def _fault(run: _Run, fault: Fault, nursery: trio.Nursery) -> None:
    rng = random.Random(f"{run.seed} {fault.kind} {fault.at_min}")
    await trio.sleep_until(fault.at_min * 60.0)
    end = fault.until_min * 60.0
    nodes = run.all_nodes()
    if fault.kind == "partition":
        names = [n.name for n in nodes]
        side = set(names[::2])
        run.sim.partition(side, set(names) - side)
        run.event("partition", f"{len(side)} | {len(names) - len(side)} nodes")
        await trio.sleep_until(end)
        run.sim.heal()
        run.event("heal", "partition healed")
    elif fault.kind == "churn":
        target = round(len(nodes) * fault.fraction)
        run.event("churn", f"{fault.fraction:.0%} of {len(nodes)} nodes offline at a time")
        offline: list[SimNode] = []
        while trio.current_time() < end:
            for node in list(offline):
                if rng.random() < 1.0 / fault.period_min:
                    offline.remove(node)
                    run.sim.set_online(node.name, True)
            candidates = [n for n in nodes if n not in offline and not n.lost]
            for node in rng.sample(candidates, max(0, min(len(candidates), target - len(offline)))):
                offline.append(node)
                run.sim.set_online(node.name, False)
            await trio.sleep(60.0)
        for node in offline:
            run.sim.set_online(node.name, True)
        run.event("churn_end", "every churned node back online")
    elif fault.kind == "never_together":
        run.event("never_together", "each identity's devices take turns being online")
        turn = together = 0
        before = _same_identity_messages(run)
        while trio.current_time() < end:
            for devices in run.devices.values():
                for i, device in enumerate(devices):
                    run.sim.set_online(device.name, i % len(devices) == turn % len(devices))
                online = sum(1 for d in devices if run.sim.is_online(d.name))
                together = max(together, online)
            turn += 1
            await trio.sleep(min(fault.period_min * 60.0, max(0.0, end - trio.current_time())))
        # Ops made at least two turns before the end had every device online once since.
        due = [
            op
            for op in run.ops
            if op.kind != "link"
            and fault.at_min * 60.0 <= op.at <= end - 2 * fault.period_min * 60.0
        ]
        await _sample(run)
        run.apart.append(
            {
                "from_min": fault.at_min,
                "until_min": fault.until_min,
                "max_devices_of_an_identity_online_together": together,
                "device_to_device_messages": _same_identity_messages(run) - before,
                "ops_due": len(due),
                "ops_converged_apart": sum(
                    1 for op in due if op.converged_at is not None and op.converged_at <= end
                ),
            }
        )
        for devices in run.devices.values():
            for device in devices:
                run.sim.set_online(device.name, True)
        run.event("never_together_end", "devices online together again")
    elif fault.kind == "lose_device":
        idents = sorted(run.devices)
        victims = rng.sample(idents, max(1, round(len(idents) * fault.fraction)))
        lost: list[tuple[int, SimNode, frozenset[str]]] = []
        for ident in victims:
            device = run.devices[ident][-1]
            device.lost = True
            run.sim.set_online(device.name, False)
            device.stop.set()
            run.lost_devices.append((ident, device))
            live = frozenset(m for m in run.created[ident] if m not in run.deleted[ident])
            lost.append((ident, device, live))
        run.event("lose_device", f"{len(victims)} devices lost their disk")
        await trio.sleep_until(end)
        run.event("restore", f"{len(victims)} new devices restore from the storage network")
        async with trio.open_nursery() as restoring:
            for ident, old, live in lost:
                restoring.start_soon(_restore_device, run, ident, old, live, rng)
    elif fault.kind == "malicious":
        await _malicious(run, fault, rng)
    elif fault.kind == "restart_storage":
        await _restart_storage(run, fault, rng)
    else:
        raise SystemExit(f"unknown fault kind {fault.kind!r}")


async def _malicious(run: _Run, fault: Fault, rng: random.Random) -> None:
    """The last ``fraction`` of the storage nodes turn bad (sims.malicious): corrupt shards and
    mailbox items from now on, and every ``period_min`` each attacks a device of a random
    identity with garbage frames, forged ops and a flood of sessions."""
    count = max(1, round(len(run.storage) * fault.fraction))
    for node in run.storage[-count:]:
        assert node.node is not None
        node.malicious = True
        node_rng = random.Random(f"{run.seed} {node.name}")
        run.corrupt.append(malicious.corrupt_storage(node.node, node_rng))
        run.attackers.append(
            malicious.Attacker(node.name, run.sim.node(node.name), node.seed, node_rng)
        )
    run.event("malicious", f"{count} storage nodes turn malicious")
    end = fault.until_min * 60.0
    while trio.current_time() < end:
        for attacker in run.attackers:
            ident = rng.choice(sorted(run.devices))
            devices = run.devices[ident]
            online = [d for d in devices if not d.lost and run.sim.is_online(d.name)]
            if not online:
                continue
            target = rng.choice(online)
            victim = device_id_for(rng.choice(devices).name)
            live = [m for m in run.created[ident] if m not in run.deleted[ident]]
            await attacker.garbage(target.name)
            await attacker.forged_ops(target.name, victim, live)
            await attacker.flood(target.name)
        await trio.sleep(fault.period_min * 60.0)
    run.event("malicious_end", "the malicious nodes stop attacking (they still serve corrupt data)")


async def _held(node: SimNode) -> dict[str, int]:
    assert node.online is not None
    state = await expect(await call(node.online.storage, sg.StorageState))
    return {
        "objects": state.objects,
        "mail_items": state.mail_items,
        "bytes_held": state.bytes_held,
        "identities": state.identities,
    }


async def _restart_storage(run: _Run, fault: Fault, rng: random.Random) -> None:
    """``fraction`` of the storage nodes stop (their actors end, their listener closes, every
    connection to them drops) and, at ``until_min``, start again on their :class:`SimDisk`:
    what a `dmgn stop` and `dmgn start` of a storage node's process does to its peers."""
    count = max(1, round(len(run.storage) * fault.fraction))
    nodes = sorted(rng.sample(run.storage, count), key=lambda n: n.name)
    assert run.nursery is not None
    before: dict[str, dict[str, int]] = {}
    for node in nodes:
        before[node.name] = await _held(node)
        node.stop.set()
        await node.done.wait()
    run.event("restart_storage", f"{count} storage nodes stop")
    await trio.sleep_until(fault.until_min * 60.0)
    for node in nodes:
        node.stop, node.done = trio.Event(), trio.Event()
        await _start(run.nursery, run.sim, node, node.bootstrap, run.sc)
        run.storage_restarts.append(
            {
                "node": node.name,
                "t_min": run.minute(),
                "held_before": before[node.name],
                "held_after": await _held(node),
            }
        )
    run.event("restart_storage_end", f"{count} storage nodes started again from their disks")


async def _honest_view(run: _Run) -> dict[str, Any]:
    """What the honest nodes recorded about the attackers: reputation violations (peering) and
    the keepers' scores of the bad storage nodes."""
    prefixes: set[str] = set()
    for attacker in run.attackers:
        prefixes.update(key.hex()[:16] for key in attacker.identities)
    bad_storage: set[str] = set()
    for node in run.storage:
        if node.malicious and node.node is not None:
            who = await expect(await call(node.node.vault, vt.Whoami))
            # Strangers know a storage node by its storage key, not its identity (issue 20).
            bad_storage.add(who.storage_public_key.hex()[:16])
    prefixes |= bad_storage
    violations = 0.0
    nodes_with_violations = 0
    reasons: dict[str, int] = {}
    keeper_scores: list[int] = []
    for node in run.all_nodes():
        if node.malicious or node.lost or node.online is None:
            continue
        state = await expect(await call(node.online.peering, PeeringState))
        mine = 0.0
        for key, row in state.reputation.items():
            if key.split("/", 1)[0] in prefixes:
                mine += row["violations"]
                if row["last_reason"]:
                    short = " ".join(str(row["last_reason"]).split()[:6])
                    reasons[short] = reasons.get(short, 0) + 1
        violations += mine
        nodes_with_violations += 1 if mine else 0
        if node.identity >= 0:
            scores = (await node.online.durability()).peer_scores
            keeper_scores.extend(v for k, v in scores.items() if k in bad_storage)
    return {
        "violations_recorded": round(violations, 2),
        "nodes_that_recorded_violations": nodes_with_violations,
        "last_reasons": dict(sorted(reasons.items())),
        "keepers_scoring_bad_storage_down": sum(1 for v in keeper_scores if v < 0),
        "lowest_keeper_score_of_bad_storage": min(keeper_scores) if keeper_scores else None,
    }


def _connections(run: _Run) -> dict[str, Any]:
    """Connections opened and dials refused over the run, by kind of link: each opened one is
    a Noise handshake, so reconnections show here (a storage link closed as idle before each
    sync round doubled the handshakes of a run)."""

    def kind(a: str, b: str) -> str:
        sides = ["storage" if n.startswith("storage-") else "device" for n in (a, b)]
        return "_to_".join(sides)

    opened: dict[str, int] = {}
    refused: dict[str, int] = {}
    for table, into in ((run.sim.opened, opened), (run.sim.refused, refused)):
        for (a, b), n in table.items():
            into[kind(a, b)] = into.get(kind(a, b), 0) + n
    return {
        "opened": sum(opened.values()),
        "refused": sum(refused.values()),
        "opened_by_kind": dict(sorted(opened.items())),
        "refused_by_kind": dict(sorted(refused.items())),
    }


def _same_identity_messages(run: _Run) -> int:
    owner = {d.name: ident for ident, ds in run.devices.items() for d in ds}
    return sum(
        s.messages
        for (a, b), s in run.sim.stats.items()
        if a in owner and owner[a] == owner.get(b, -1)
    )


#: How long a new device waits for storage peers before it restores with what answered.
RESTORE_PEER_WAIT = 120.0


async def _restore_device(
    run: _Run, ident: int, old: SimNode, live: frozenset[str], rng: random.Random
) -> None:
    """A new device of the identity (its seed only: the vault export) restores from the storage
    nodes alone, then rejoins its identity's other devices."""
    await old.done.wait()
    assert run.nursery is not None
    replacement = SimNode(old.name + "-new", ident, old.seed)
    storage = [n.name for n in run.storage]
    peers = rng.sample(storage, min(run.sc.bootstrap_addresses, 2, len(storage)))
    await _start(run.nursery, run.sim, replacement, tuple(f"mem://{p}" for p in peers), run.sc)
    assert replacement.online is not None
    started = trio.current_time()
    connected = await replacement.online.wait_for_storage_peers(
        min(3, len(storage)), RESTORE_PEER_WAIT
    )
    connected = await replacement.online.settle_storage_peers(RESTORE_PEER_WAIT)
    report = await replacement.online.restore()
    held = await replacement.ids()
    # Nothing came from the identity's other devices: the new device has had no device session
    # with them (no gossip message either way). Wire messages with them may exist: a storage
    # node passes on every storage offer it knows, our devices' among them (their storage
    # keys cannot be told from a stranger's), and the new device learns which are its own by
    # asking inside a storage session (AskOwn), then closes it.
    gossip_with_devices = sum(replacement.online.sent_to_devices.values())
    own = {d.name for d in run.devices[ident]} - {old.name}
    from_devices = sum(
        link.messages
        for (a, b), link in run.sim.stats.items()
        if replacement.name in (a, b) and ({a, b} & own)
    )
    # Still live now (the other devices may have deleted some meanwhile).
    wanted = {m for m in live if m not in run.deleted[ident]}
    run.restores.append(
        {
            "identity": ident,
            "device": replacement.name,
            "t_min": run.minute(),
            "storage_peers": connected,
            "wanted": len(wanted),
            "restored": len(wanted & held),
            "entries": report.entries,
            "memories_rebuilt": report.memories,
            "unrecoverable": len(report.unrecoverable),
            "messages_with_own_devices": from_devices,
            "gossip_with_own_devices": gossip_with_devices,
            "virtual_s": round(trio.current_time() - started, 3),
        }
    )
    devices = run.devices[ident]
    devices[devices.index(old)] = replacement
    for other in devices:
        if other is not replacement:
            await replacement.online.add_peer(f"mem://{other.name}")
            break


async def run(sc: Scenario, seed: int) -> dict[str, Any]:
    """Run ``sc`` and return its metrics document (virtual time only)."""
    sim = SimNetwork(seed=seed)
    sim.set_latency(sc.latency_ms / 1000, sc.jitter_ms / 1000)
    state = _Run(sc, seed, sim, random.Random(seed))
    async with _nodes(state) as nursery:
        state.nursery = nursery
        state.event("start", f"{sc.nodes} nodes up")
        start_stats = sim.total()
        async with trio.open_nursery() as inner:
            inner.start_soon(_sampler, state)
            inner.start_soon(_shard_sampler, state)
            async with trio.open_nursery() as work:
                await _faults(state, work)
                for ident in sorted(state.devices):
                    work.start_soon(_workload_for, state, ident, random.Random(f"{seed} w {ident}"))
            for node in state.all_nodes():
                state.sim.set_online(node.name, True)
            state.sim.heal()
            state.event("workload_end", "every node online, waiting for convergence")
            converged = await _settle(state)
            inner.cancel_scope.cancel()
        await _sample(state)
        await _shard_sample(state)
        document = await _report(state, converged, start_stats.messages)
        _ = nursery
    return document


async def _settle(run: _Run) -> float | None:
    start = trio.current_time()
    with trio.move_on_after(SETTLE_DEADLINE):
        while True:
            if await _all_equal(run):
                return round(trio.current_time() - start, 3)
            await trio.sleep(SAMPLE_EVERY)
    return None


async def _all_equal(run: _Run) -> bool:
    for devices in run.devices.values():
        seen = None
        for d in devices:
            inv = await d.inventory()
            key = (
                inv.memories,
                inv.tombstones,
                frozenset((lk.from_id, lk.to_id) for lk in inv.links),
            )
            if seen is not None and key != seen:
                return False
            seen = key
    return True


async def _final_checks(run: _Run, final: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The devices' stores compared with each other and the ops made; the memories they hold
    checked against the shards the (online) storage nodes hold."""
    views: dict[int, list[checks.StoreView]] = {}
    memories: dict[int, tuple[ShardKeys, frozenset[str]]] = {}
    k = n = 0
    for ident, devices in sorted(run.devices.items()):
        views[ident] = []
        for d in devices:
            inv = await d.inventory()
            links = frozenset((lk.from_id, lk.to_id) for lk in inv.links)
            views[ident].append(checks.StoreView(inv.memories, inv.tombstones, links))
        first = devices[0]
        assert first.node is not None and first.online is not None
        durability = await first.online.durability()
        k, n = durability.k, durability.n
        held = frozenset().union(*(v.memories for v in views[ident]))
        memories[ident] = (await checks.shard_keys(first.node), held)
    # Every node with a storage service may hold shards: storage nodes, and devices (of other
    # identities) found through peer exchange, online and honest ones.
    storage = [
        tables
        for node in run.all_nodes()
        if node.node is not None
        and not node.lost
        and run.sim.is_online(node.name)
        and not node.malicious
        if (tables := checks.storage_tables(node.node)) is not None
    ]
    shards = checks.durability_from_storage(k, n, memories, storage)
    return (
        checks.stores_agree(views, run.created, run.deleted),
        shards.as_json(final.get("lost", 0), final.get("unplaced", 0)),
    )


async def _discovery_report(run: _Run) -> dict[str, Any]:
    """How devices found their storage peers: at most two bootstrap addresses each, the rest
    through peer exchange."""
    first = sorted(run.first_durable.values())
    asked = answered = learnt = 0
    nodes = 0
    for node in run.all_nodes():
        if node.node is None or node.lost or node.online is None:
            continue
        status = await node.online.peering_status()
        if status.exchange is not None:
            nodes += 1
            asked += status.exchange["asked"]
            answered += status.exchange["answered"]
            learnt += status.exchange["learnt"]
    return {
        "bootstrap_addresses_max": max((len(n.bootstrap) for n in run.all_nodes()), default=0),
        "minutes_to_first_durable": {
            "devices": len(first),
            "p50": first[len(first) // 2] if first else None,
            "max": first[-1] if first else None,
        },
        "exchange_per_node": {
            "asked": round(asked / nodes, 2) if nodes else 0,
            "answered": round(answered / nodes, 2) if nodes else 0,
            "offers_learnt": round(learnt / nodes, 2) if nodes else 0,
        },
    }


async def _report(run: _Run, settled: float | None, _start: int) -> dict[str, Any]:
    sc = run.sc
    device_names = {d.name: ident for ident, ds in run.devices.items() for d in ds}
    for _ident, old in run.lost_devices:
        device_names[old.name] = _ident
    same_identity = other = 0
    same_bytes = other_bytes = 0
    for (a, b), s in run.sim.stats.items():
        if a in device_names and device_names.get(a) == device_names.get(b):
            same_identity += s.messages
            same_bytes += s.bytes
        else:
            other += s.messages
            other_bytes += s.bytes
    ops = len(run.ops)
    d = sc.devices_per_identity
    # Application messages our devices sent to each other, by type (the peering actors' counts):
    # gossip.ops carry ops (live pushes and answers to wants), gossip.vector / gossip.want are
    # the anti-entropy rounds; the wire figures above also hold Noise handshakes and keepalives.
    by_type: dict[str, int] = {}
    for device in [n for ds in run.devices.values() for n in ds] + [o for _, o in run.lost_devices]:
        if device.online is not None:
            for kind, n in device.online.sent_to_devices.items():
                by_type[kind] = by_type.get(kind, 0) + n
    payload = by_type.get("gossip.ops", 0)
    anti_entropy = by_type.get("gossip.vector", 0) + by_type.get("gossip.want", 0)
    delays = sorted(
        round(op.converged_at - op.at, 3) for op in run.ops if op.converged_at is not None
    )
    unconverged = sum(1 for op in run.ops if op.converged_at is None and op.kind != "link")
    final = run.samples[-1] if run.samples else {}
    stores, shards = await _final_checks(run, final)
    attacks: dict[str, Any] = {}
    if run.attackers:
        ledger = malicious.Ledger()
        for attacker in run.attackers:
            for kind, sent in attacker.ledger.sent.items():
                ledger.sent[kind] = ledger.sent.get(kind, 0) + sent
                ledger.rejected[kind] = (
                    ledger.rejected.get(kind, 0) + attacker.ledger.rejected[kind]
                )
            for reason, n in attacker.ledger.reasons.items():
                ledger.reasons[reason] = ledger.reasons.get(reason, 0) + n
            ledger.unreachable += attacker.ledger.unreachable
            ledger.timeline.extend(attacker.ledger.timeline)
        ledger.timeline.sort(key=lambda row: (row[0], row[1]))
        attacks = {
            "attacks": ledger.as_json(),
            "every_attack_rejected": all(
                ledger.rejected[k] == ledger.sent[k] for k in ledger.sent if k != "flood_sessions"
            ),
            "corrupt_objects_served": sum(t.corrupt_objects_served for t in run.corrupt),
            "forged_mail_items_served": sum(t.forged_mail_served for t in run.corrupt),
            "honest_side": await _honest_view(run),
        }
    wanted = sum(r["wanted"] for r in run.restores)
    restored = sum(r["restored"] for r in run.restores)
    return {
        "scenario": sc.name,
        "seed": run.seed,
        "params": {
            "nodes": sc.nodes,
            "identities": sc.identities,
            "devices_per_identity": d,
            "storage_nodes": sc.storage_nodes,
            "minutes": sc.minutes,
            "faults": [f.__dict__ for f in sc.faults],
        },
        "converged": settled is not None,
        "settle_s": settled,
        "ops": {
            "total": ops,
            **{k: sum(1 for o in run.ops if o.kind == k) for k in ("add", "link", "delete")},
        },
        "convergence_s": {
            "per_op": delays,
            "unconverged": unconverged,
            "p50": delays[len(delays) // 2] if delays else None,
            "p99": delays[int(len(delays) * 0.99)] if delays else None,
            "max": delays[-1] if delays else None,
            # [virtual minute of the op, kind, seconds to converge or None], adds and deletes.
            "timeline": [
                [
                    round(op.at / 60.0, 3),
                    op.kind,
                    None if op.converged_at is None else round(op.converged_at - op.at, 3),
                ]
                for op in run.ops
                if op.kind != "link"
            ],
        },
        "gossip": {
            "counts": (
                "messages_per_op: gossip.ops messages (they carry ops) between the devices of "
                "one identity, per op; anti_entropy_messages_per_op: gossip.vector and "
                "gossip.want; wire_messages_per_op: every wire frame between those devices "
                "(Noise handshakes, keepalives, queries included)"
            ),
            "messages_per_op": round(payload / ops, 2) if ops else None,
            "anti_entropy_messages_per_op": round(anti_entropy / ops, 2) if ops else None,
            "device_messages_by_type": dict(sorted(by_type.items())),
            "wire_messages_per_op": round(same_identity / ops, 2) if ops else None,
            "messages_same_identity": same_identity,
            "bytes_same_identity": same_bytes,
            "bytes_per_op": round(same_bytes / ops, 1) if ops else None,
            "flooding_messages_per_op": d * (d - 1),
            "limit_messages_per_op": 2 * d,
            "messages_other": other,
            "bytes_other": other_bytes,
        },
        "connections": _connections(run),
        "discovery": await _discovery_report(run),
        "shards": {
            # As the keepers count it (their placement records).
            "final": final,
            # From what the storage nodes hold (sims.checks).
            "from_storage": shards,
            "every_memory_durable_or_reported_lost": shards[
                "every_memory_durable_or_reported_lost"
            ],
        },
        "stores": stores,
        "restores": run.restores,
        "storage_restarts": run.storage_restarts,
        "restore_success": round(restored / wanted, 4) if wanted else None,
        "never_together": run.apart,
        "malicious": attacks,
        "events": run.events,
        "samples": run.samples,
    }
