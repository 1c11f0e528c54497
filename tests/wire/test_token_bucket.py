"""The one token bucket: fed the time, it spends only what refilled, and never reads a clock."""

from __future__ import annotations

import pytest

from wire import TokenBucket


def test_starts_full_then_refuses_until_refilled() -> None:
    bucket = TokenBucket(rate=2.0, burst=3.0)
    assert [bucket.take(1, now=100.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(1, now=100.4)  # 0.8 tokens so far
    assert bucket.take(1, now=100.5)


def test_a_refused_take_spends_nothing() -> None:
    bucket = TokenBucket(rate=1.0, burst=5.0)
    assert not bucket.take(6, now=0.0)
    assert bucket.take(5, now=0.0)


def test_refill_stops_at_burst() -> None:
    bucket = TokenBucket(rate=1.0, burst=2.0)
    assert bucket.take(2, now=0.0)
    assert bucket.take(2, now=1000.0)
    assert not bucket.take(1, now=1000.0)


def test_the_first_use_is_the_start_whatever_the_clock_reads() -> None:
    # A bucket made before the clock runs is full at its first use, not refilled since 0.
    bucket = TokenBucket(rate=1.0, burst=1.0)
    assert bucket.take(1, now=-5.0)
    assert not bucket.take(1, now=-4.5)


def test_overdraw_spends_into_debt_and_says_how_long_it_takes_to_refill() -> None:
    bucket = TokenBucket(rate=100.0, burst=100.0)
    assert bucket.overdraw(60, now=0.0) == 0.0
    assert bucket.overdraw(90, now=0.0) == pytest.approx(0.5)
    assert not bucket.take(1, now=0.5)  # the debt is paid, nothing more yet
    assert bucket.take(1, now=0.51)


def test_given_credit_above_burst_stays_while_refilling() -> None:
    bucket = TokenBucket(rate=10.0, burst=4.0)
    bucket.give(6, now=0.0)  # 10 tokens: earned above the burst of 4
    assert bucket.take(7, now=10.0)  # still 10 after ten seconds: refilling never lowers it
    assert bucket.take(3, now=10.0)
    assert not bucket.take(1, now=10.0)
