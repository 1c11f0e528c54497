"""Connections at the production intervals: a quiet link stays up between sync rounds."""

from __future__ import annotations

import contextlib

import trio
import trio.testing

from sims import engine
from sims.__main__ import run_scenario
from sims.determinism import deterministic
from sims.devices import sim_device
from sims.network import SimNetwork


def test_storage_links_stay_open_between_sync_rounds_at_the_production_intervals() -> None:
    # One identity's two devices, three storage nodes, nothing but the periodic rounds: sync
    # 60 s (the keepers ask their storage peers for mail heads once a round) and redial 5 s.
    scenario = engine._replace(
        engine.load("steady"),
        identities=1,
        devices_per_identity=2,
        storage_nodes=3,
        minutes=12,
        sync_interval_s=60.0,
        redial_interval_s=5.0,
    )
    document = run_scenario(scenario, 3)
    assert document["converged"]
    opened = {round(s["t_min"]): s["connections_opened"] for s in document["samples"]}
    kinds = document["connections"]["opened_by_kind"]
    # Links: each device to its 3 storage peers, storage-2 to -1 and -1 to -0, dev1 to dev0.
    links = 2 * 3 + 2 + 1
    assert kinds["device_to_device"] == 1
    # From minute 6 to 12 a storage link opens at most one connection: the device-mode probe
    # of a storage-only peer (backing off to every 300 s). A stranger idle timeout shorter
    # than the sync interval closed every storage link before each round instead, and the
    # redial cost two handshakes (device mode refused, then storage mode).
    assert opened[12] - opened[6] <= links - 1


def test_a_device_back_from_offline_reconnects_its_storage_peers_within_a_redial_interval() -> None:
    # A device with storage peers only (no other device to redial every 5 s) is off the
    # network for ten minutes: its storage peers back off towards STORAGE_REDIAL_CEILING
    # (60 s), but with no connection at all it dials something once a redial interval, and
    # its first connection makes every target due again. (Under sims.determinism, like a sim
    # run: the store's blocking calls run inline, so the virtual clock cannot outrun them.)
    with deterministic(2):
        trio.run(_offline_and_back, clock=trio.testing.MockClock(autojump_threshold=0))


async def _offline_and_back() -> None:
    sim = SimNetwork(seed=2)
    names = [f"storage-{i}" for i in range(2)]
    async with contextlib.AsyncExitStack() as stack:
        for name in names:
            await stack.enter_async_context(sim_device(sim, name, name.encode().ljust(32, b".")))
        await stack.enter_async_context(
            sim_device(
                sim,
                "me",
                b"me" * 16,
                bootstrap=tuple(f"mem://{n}" for n in names),
                sync_interval=60.0,
                redial_interval=5.0,
            )
        )
        await trio.sleep(30)
        assert all(sim.opened.get(("me", n)) for n in names)
        sim.set_online("me", False)
        await trio.sleep(600)
        refused = sum(sim.refused.get(("me", n), 0) for n in names)
        # The storage peers' backoff (1, 2, 4 ... 32 s, then 30-60 s) and a probe at most
        # every 5 s (jittered down by up to half).
        assert refused <= 2 * (6 + 600 / 30) + 600 / (5 * 0.5) + 1
        opened = {n: sim.opened[("me", n)] for n in names}
        sim.set_online("me", True)
        back = trio.current_time()
        # Checked every 0.1 virtual s (the sim network has no event for a new connection).
        with trio.fail_after(5.0 + 2.0):
            while any(sim.opened[("me", n)] == opened[n] for n in names):  # noqa: ASYNC110
                await trio.sleep(0.1)
        assert trio.current_time() - back <= 5.0 + 2.0
