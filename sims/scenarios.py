"""Scenarios: what happens to a person's devices under latency, partitions and disk loss.

Each scenario is a coroutine returning a :class:`ScenarioResult` (metrics + a timeline of how
many memories each device holds). Time is virtual (``trio.testing.MockClock``): a run that
spans minutes of simulated time takes seconds, and timings do not depend on the machine.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from dmgn import api
from dmgn.identity import new_seed
from sims.devices import SimDevice, sim_device
from sims.network import SimNetwork

#: How often convergence is checked (virtual seconds).
POLL = 0.05
#: Give up on convergence after this long (virtual seconds): a sim that does not converge must
#: fail, not hang.
CONVERGENCE_DEADLINE = 300.0


@dataclass
class ScenarioResult:
    name: str
    seed: int
    params: dict[str, Any]
    metrics: dict[str, float | int] = field(default_factory=dict)
    #: (virtual time, device, memories held) samples.
    timeline: list[tuple[float, str, int]] = field(default_factory=list)
    #: (x, y) series for plots, by name.
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seed": self.seed,
            "params": self.params,
            "metrics": self.metrics,
            "timeline": self.timeline,
            "series": self.series,
        }


class NotConverged(Exception):
    pass


@asynccontextmanager
async def sampling(
    devices: Sequence[SimDevice], result: ScenarioResult, every: float = 0.1
) -> AsyncIterator[None]:
    """Record how many memories each device holds, every ``every`` virtual seconds."""

    async def sample_once() -> None:
        now = round(trio.current_time(), 3)
        for device in devices:
            result.timeline.append((now, device.name, len(await device.ids())))

    async def sample() -> None:
        while True:
            await sample_once()
            await trio.sleep(every)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        yield
        nursery.cancel_scope.cancel()
    await sample_once()  # the final state, whenever the scenario ended


async def wait_converged(
    devices: Sequence[SimDevice], result: ScenarioResult, expected: int | None = None
) -> float:
    """Wait until every device holds the same memory ids; return the virtual time taken."""
    start = trio.current_time()
    with trio.move_on_after(CONVERGENCE_DEADLINE):
        while True:
            sets = [await d.ids() for d in devices]
            now = trio.current_time()
            if all(s == sets[0] for s in sets) and (expected is None or len(sets[0]) == expected):
                return now - start
            await trio.sleep(POLL)
    raise NotConverged(
        f"{result.name}: devices did not converge within {CONVERGENCE_DEADLINE:g} virtual seconds"
    )


async def add_memories(device: SimDevice, count: int, rng: random.Random, tag: str) -> list[str]:
    ids = []
    for i in range(count):
        response = await device.node.request(
            api.AddMemory(content=f"{tag} note {i}: {rng.choice(TOPICS)} on {rng.choice(DAYS)}")
        )
        ids.append(response["id"])
        await trio.sleep(rng.uniform(0.0, 0.05))
    return ids


TOPICS = (
    "the tea Alice likes",
    "the Rust borrow checker",
    "a trip to Lisbon",
    "the quarterly budget",
    "a bug in the parser",
    "Bob's new address",
)
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")


def _wire(sim: SimNetwork) -> tuple[int, int]:
    total = sim.total()
    return total.messages, total.bytes


async def partition_heal(
    seed: int = 1, devices: int = 3, per_device: int = 20, latency: float = 0.02
) -> ScenarioResult:
    """Devices converge, split into two sides that both change things, then heal."""
    rng = random.Random(seed)
    result = ScenarioResult(
        "partition_heal", seed, {"devices": devices, "per_device": per_device, "latency_s": latency}
    )
    sim = SimNetwork(seed=seed)
    sim.set_latency(latency, jitter=latency / 4)
    identity = rng.randbytes(32) if seed else new_seed()
    names = [f"device-{i}" for i in range(devices)]
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                sim_device(sim, name, identity, bootstrap=() if i == 0 else ("mem://device-0",))
            )
            for i, name in enumerate(names)
        ]
        await stack.enter_async_context(sampling(nodes, result))
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(
                    add_memories, node, per_device, random.Random(rng.random()), node.name
                )
        result.metrics["initial_converge_s"] = await wait_converged(
            nodes, result, devices * per_device
        )
        messages_before, bytes_before = _wire(sim)

        # Deleted on one side of the partition, while the other side still has it.
        victim = sorted(await nodes[0].ids())[0]
        left, right = set(names[: devices // 2 + 1]), set(names[devices // 2 + 1 :])
        sim.partition(left, right)
        partition_at = trio.current_time()
        left_node, right_node = nodes[0], nodes[-1]
        await add_memories(left_node, per_device, rng, "left")
        right_ids = await add_memories(right_node, per_device, rng, "right")
        await right_node.node.request(api.DeleteMemory(id=victim))
        await right_node.node.request(api.LinkMemories(from_id=right_ids[0], to_id=right_ids[1]))
        await trio.sleep(5.0)  # the partition lasts a while
        sim.heal()
        heal_at = trio.current_time()
        expected = devices * per_device + 2 * per_device - 1
        result.metrics["converge_after_heal_s"] = await wait_converged(nodes, result, expected)
        for node in nodes:
            if victim in await node.ids():
                raise AssertionError(f"{node.name} still holds a deleted memory")
        messages, total_bytes = _wire(sim)
        ops = 2 * per_device + 2
        result.metrics.update(
            {
                "partition_s": round(heal_at - partition_at, 3),
                "memories": expected,
                "messages_per_op_after_heal": round((messages - messages_before) / ops, 2),
                "bytes_per_op_after_heal": round((total_bytes - bytes_before) / ops, 1),
                "wire_messages_total": messages,
                "wire_bytes_total": total_bytes,
            }
        )
    return result


async def scale(
    seed: int = 1, sizes: Sequence[int] = (2, 3, 4, 6), per_device: int = 10, latency: float = 0.03
) -> ScenarioResult:
    """Convergence time and traffic per memory as the number of devices grows (a star)."""
    result = ScenarioResult(
        "scale", seed, {"sizes": list(sizes), "per_device": per_device, "latency_s": latency}
    )
    times: list[tuple[float, float]] = []
    per_memory: list[tuple[float, float]] = []
    for n in sizes:
        rng = random.Random(seed * 1000 + n)
        sim = SimNetwork(seed=seed)
        sim.set_latency(latency)
        identity = rng.randbytes(32)
        async with AsyncExitStack() as stack:
            nodes = [
                await stack.enter_async_context(
                    sim_device(sim, f"d{i}", identity, bootstrap=() if i == 0 else ("mem://d0",))
                )
                for i in range(n)
            ]
            await wait_converged(nodes, result, 0)
            start_bytes = sim.total().bytes
            async with trio.open_nursery() as nursery:
                for node in nodes:
                    nursery.start_soon(
                        add_memories, node, per_device, random.Random(rng.random()), node.name
                    )
            elapsed = await wait_converged(nodes, result, n * per_device)
            total_bytes = sim.total().bytes
        times.append((n, round(elapsed, 3)))
        per_memory.append((n, round((total_bytes - start_bytes) / (n * per_device), 1)))
        result.metrics[f"converge_s_{n}_devices"] = round(elapsed, 3)
        result.metrics[f"bytes_per_memory_{n}_devices"] = per_memory[-1][1]
    result.series["converge_s_by_devices"] = times
    result.series["bytes_per_memory_by_devices"] = per_memory
    return result


async def disk_loss(seed: int = 1, per_device: int = 30, latency: float = 0.02) -> ScenarioResult:
    """A device loses everything and comes back empty (same identity, new device): it gets
    every memory back from its sibling."""
    rng = random.Random(seed)
    result = ScenarioResult("disk_loss", seed, {"per_device": per_device, "latency_s": latency})
    sim = SimNetwork(seed=seed)
    sim.set_latency(latency)
    identity = rng.randbytes(32)
    async with sim_device(sim, "laptop", identity) as laptop:
        async with (
            sim_device(sim, "desktop", identity, bootstrap=("mem://laptop",)) as desktop,
            sampling([laptop, desktop], result),
        ):
            await add_memories(laptop, per_device, rng, "laptop")
            await add_memories(desktop, per_device, rng, "desktop")
            await wait_converged([laptop, desktop], result, 2 * per_device)
        # The desktop is gone; a new machine is set up with the same identity.
        async with (
            sim_device(sim, "new-desktop", identity, bootstrap=("mem://laptop",)) as replacement,
            sampling([laptop, replacement], result),
        ):
            result.metrics["restore_s"] = await wait_converged(
                [laptop, replacement], result, 2 * per_device
            )
    result.metrics["memories"] = 2 * per_device
    return result


SCENARIOS: dict[str, Callable[..., Awaitable[ScenarioResult]]] = {
    "partition_heal": partition_heal,
    "scale": scale,
    "disk_loss": disk_loss,
}
