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

from actors import store as st
from actors.node import Networking, RunningNode
from actors.runtime import call, expect
from dmgn import api
from sims.devices import sim_device
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
    kind: str  # partition | churn | lose_device | never_together
    at_min: float
    until_min: float
    #: churn: share of nodes offline at any time; lose_device: share of identities losing one.
    fraction: float = 0.3
    #: churn: mean minutes a node stays offline; never_together: minutes per turn.
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
    #: Storage nodes each device is given as bootstrap peers.
    storage_peers_per_device: int = 8
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

    async def inventory(self) -> st.StoreInventory:
        assert self.node is not None
        return await expect(await call(self.node.store, st.Inventory))

    async def ids(self) -> frozenset[str]:
        assert self.node is not None
        return await expect(await call(self.node.store, st.Ids))


async def _start(
    nursery: trio.Nursery, sim: SimNetwork, node: SimNode, bootstrap: tuple[str, ...], sc: Scenario
) -> None:
    async def serve(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with sim_device(
            sim, node.name, node.seed, bootstrap=bootstrap, sync_interval=sc.sync_interval_s
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
            await _start(nursery, run.sim, node, ("mem://storage-0",) if i else (), sc)
        for ident in range(sc.identities):
            seed = _seed(run.seed, f"identity-{ident}")
            run.devices[ident] = []
            run.created[ident] = []
            run.deleted[ident] = set()
            for d in range(sc.devices_per_identity):
                name = f"id{ident}-dev{d}"
                peers = rng.sample(
                    storage_names, min(sc.storage_peers_per_device, len(storage_names))
                )
                bootstrap = tuple(f"mem://{p}" for p in ([f"id{ident}-dev0"] if d else []) + peers)
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
    """Shard availability as each identity's first reachable device sees it."""
    memories = durable = lost = repair = unplaced = 0
    for ident, devices in run.devices.items():
        for device in devices:
            if device.online is not None and not device.lost and run.sim.is_online(device.name):
                d = await device.online.durability()
                memories += d.memories
                durable += d.durable
                lost += d.lost
                unplaced += d.unplaced
                repair += d.repair_bytes
                break
        else:
            _ = ident
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
            "offline_nodes": len(run.sim._offline),
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
        turn = 0
        while trio.current_time() < end:
            for devices in run.devices.values():
                for i, device in enumerate(devices):
                    run.sim.set_online(device.name, i % len(devices) == turn % len(devices))
            turn += 1
            await trio.sleep(fault.period_min * 60.0)
        for devices in run.devices.values():
            for device in devices:
                run.sim.set_online(device.name, True)
        run.event("never_together_end", "devices online together again")
    elif fault.kind == "lose_device":
        # The code below ran, but its test did not finish within 10 real minutes (a stopped
        # node or its replacement hangs); refused until that is found.
        raise SystemExit("fault lose_device is not working yet in sims (a run hangs); see issue 18")
        idents = sorted(run.devices)
        victims = rng.sample(idents, max(1, round(len(idents) * fault.fraction)))
        for ident in victims:
            device = run.devices[ident][-1]
            device.lost = True
            device.stop.set()
            run.sim.set_online(device.name, False)
            run.lost_devices.append((ident, device))
        run.event("lose_device", f"{len(victims)} devices lost their disk")
        await trio.sleep_until(end)
        for ident, old in run.lost_devices:
            await old.done.wait()
            run.sim.set_online(old.name, True)
            name = old.name + "-new"
            replacement = SimNode(name, ident, old.seed)
            peers = [n.name for n in run.devices[ident] if n is not old]
            await _start(nursery, run.sim, replacement, tuple(f"mem://{p}" for p in peers), run.sc)
            run.devices[ident][run.devices[ident].index(old)] = replacement
        run.event("restore", f"{len(victims)} replacement devices started empty")
    else:
        raise SystemExit(f"unknown fault kind {fault.kind!r}")


async def run(sc: Scenario, seed: int) -> dict[str, Any]:
    """Run ``sc`` and return its metrics document (virtual time only)."""
    sim = SimNetwork(seed=seed)
    sim.set_latency(sc.latency_ms / 1000, sc.jitter_ms / 1000)
    state = _Run(sc, seed, sim, random.Random(seed))
    async with _nodes(state) as nursery:
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
    delays = sorted(
        round(op.converged_at - op.at, 3) for op in run.ops if op.converged_at is not None
    )
    unconverged = sum(1 for op in run.ops if op.converged_at is None and op.kind != "link")
    restored = []
    for ident, old in run.lost_devices:
        new = run.devices[ident][[n.name for n in run.devices[ident]].index(old.name + "-new")]
        want = {m for m in run.created[ident] if m not in run.deleted[ident]}
        have = await new.ids()
        restored.append({"identity": ident, "wanted": len(want), "restored": len(want & have)})
    final = run.samples[-1] if run.samples else {}
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
        },
        "gossip": {
            "messages_same_identity": same_identity,
            "bytes_same_identity": same_bytes,
            "messages_per_op": round(same_identity / ops, 2) if ops else None,
            "bytes_per_op": round(same_bytes / ops, 1) if ops else None,
            "flooding_messages_per_op": d * (d - 1),
            "limit_messages_per_op": 2 * d,
            "messages_other": other,
            "bytes_other": other_bytes,
        },
        "shards": {
            "final": final,
            "every_memory_durable_or_reported_lost": bool(final)
            and final["durable"] + final["lost"] == final["memories_placed"],
        },
        "restores": restored,
        "events": run.events,
        "samples": run.samples,
    }
