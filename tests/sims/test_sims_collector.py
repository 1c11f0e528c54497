"""The sims' collector settings hold inside a run and are put back after it."""

from __future__ import annotations

import gc

import pytest
import trio

from sims import engine
from sims.__main__ import run_scenario
from sims.collector import THRESHOLDS, few_collections


def test_the_collector_runs_rarely_inside_a_sim_and_as_before_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = gc.get_threshold()
    seen: list[tuple[int, int, int]] = []

    original = engine.run

    async def spying(scenario: engine.Scenario, seed: int) -> dict[str, object]:
        seen.append(gc.get_threshold())
        await trio.lowlevel.checkpoint()
        return await original(scenario, seed)

    monkeypatch.setattr(engine, "run", spying)
    run_scenario(engine._replace(engine.load("steady"), minutes=1, identities=1), 1)
    assert seen == [THRESHOLDS]
    assert gc.get_threshold() == before
    with few_collections():
        assert gc.get_threshold() == THRESHOLDS
    assert gc.get_threshold() == before
