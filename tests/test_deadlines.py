"""tests/_deadlines.py: the factor real-process tests stretch their deadlines by."""

from __future__ import annotations

import pytest

from tests import _deadlines


def test_the_environment_sets_the_factor_but_never_below_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(_deadlines.ENVIRONMENT, "2.5")
    assert _deadlines.scaled(10) == 25
    monkeypatch.setenv(_deadlines.ENVIRONMENT, "0.1")
    assert _deadlines.scaled(10) == 10


@pytest.mark.parametrize(("load", "factor"), [(0.2, 1.0), (3.0, 1.5), (100.0, 4.0)])
def test_the_load_average_per_core_sets_it_within_one_and_the_cap(
    monkeypatch: pytest.MonkeyPatch, load: float, factor: float
) -> None:
    monkeypatch.delenv(_deadlines.ENVIRONMENT, raising=False)
    monkeypatch.setattr(_deadlines.os, "getloadavg", lambda: (load, 0.0, 0.0))
    monkeypatch.setattr(_deadlines.os, "cpu_count", lambda: 2)
    assert _deadlines.slowdown() == factor
    assert _deadlines.MAX_SLOWDOWN == 4.0
