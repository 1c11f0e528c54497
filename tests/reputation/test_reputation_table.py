"""The reputation table: scores from evidence, decay, bounds, persistence."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dmgn.reputation import HALF_LIFE, MAX_STRANGERS, NEUTRAL, Reputation


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def honest(table: Reputation, clock: Clock, key: str) -> None:
    table.connected(key, False)
    for _ in range(20):
        clock.now += 30
        table.answered(key, False, 40.0)
    table.audited(key, passed=10)
    clock.now += 3600
    table.disconnected(key, False)


def test_a_violator_and_an_audit_failer_drop_below_every_honest_peer() -> None:
    clock = Clock()
    table = Reputation(clock=clock)
    for key in ("aa/1", "bb/2", "cc/3"):
        honest(table, clock, key)
    honest(table, clock, "dd/4")
    table.violated("dd/4", False, "malformed gossip message")
    honest(table, clock, "ee/5")
    table.audited("ee/5", failed=1)
    scores = {k: table.score(k) for k in ("aa/1", "bb/2", "cc/3", "dd/4", "ee/5")}
    honest_floor = min(scores["aa/1"], scores["bb/2"], scores["cc/3"])
    assert honest_floor > NEUTRAL
    assert scores["dd/4"] < honest_floor and scores["ee/5"] < honest_floor
    assert table.score("never-seen") == NEUTRAL
    assert table.rows()["dd/4"]["last_reason"] == "malformed gossip message"


def test_evidence_decays_so_old_sins_fade() -> None:
    clock = Clock()
    table = Reputation(clock=clock)
    table.violated("x/1", False, "bad signature")
    table.violated("x/1", False, "bad signature")
    fresh = table.score("x/1")
    clock.now += HALF_LIFE
    week_later = table.score("x/1")
    clock.now += 10 * HALF_LIFE
    assert fresh < week_later < table.score("x/1") <= NEUTRAL + 1


def test_ten_thousand_strangers_keep_the_table_bounded_and_devices_stay() -> None:
    clock = Clock()
    table = Reputation(clock=clock)
    table.connected("our-laptop", True)
    table.connected("connected-stranger/0", False)
    for i in range(10_000):
        clock.now += 1
        table.violated(f"{i:016x}/{os.urandom(4).hex()}", False, "flood")
    assert len(table) <= MAX_STRANGERS + 1
    rows = table.rows()
    assert "our-laptop" in rows and "connected-stranger/0" in rows


def test_scores_survive_a_restart_and_a_damaged_file_starts_afresh(tmp_path: Path) -> None:
    clock = Clock()
    table = Reputation(clock=clock)
    honest(table, clock, "aa/1")
    table.violated("bb/2", False, "replayed frame")
    path = tmp_path / "peers" / "reputation.json"
    table.save(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    loaded, problem = Reputation.load(path, clock=clock)
    assert problem is None
    assert loaded.score("aa/1") == table.score("aa/1")
    assert loaded.score("bb/2") == table.score("bb/2") < NEUTRAL
    path.write_text(json.dumps({"version": 1, "peers": {"zz": {"nonsense": 1}}}))
    empty, problem = Reputation.load(path, clock=clock)
    assert len(empty) == 0 and problem is not None and "afresh" in problem
