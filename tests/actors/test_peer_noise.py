"""Peer protocol noise is logged at WARNING at most, once per kind per interval, summarised."""

from __future__ import annotations

import logging

import pytest

from actors._peer_noise import PeerNoise


def test_a_flood_of_one_kind_of_fault_writes_one_line_per_interval_with_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    noise = PeerNoise(logging.getLogger("test.noise"), interval=60, clock=lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="test.noise")
    for i in range(10_000):
        now[0] = i * 0.01  # 100 a second for 100 s
        noise.report("junk", "junk from %s", "192.0.2.1")
    lines = [r for r in caplog.records if r.name == "test.noise"]
    assert len(lines) == 2
    assert all(r.levelno == logging.WARNING and r.exc_info is None for r in lines)
    assert "and 5999 more like it" in lines[1].getMessage()
    assert noise.total == 10_000


def test_kinds_are_counted_apart_and_never_above_warning(caplog: pytest.LogCaptureFixture) -> None:
    noise = PeerNoise(logging.getLogger("test.noise2"), level=logging.ERROR, clock=lambda: 0.0)
    caplog.set_level(logging.DEBUG, logger="test.noise2")
    noise.report("a", "first kind")
    noise.report("b", "second kind", level=logging.INFO)
    noise.report("a", "first kind again")
    levels = [r.levelno for r in caplog.records if r.name == "test.noise2"]
    assert levels == [logging.WARNING, logging.INFO]
