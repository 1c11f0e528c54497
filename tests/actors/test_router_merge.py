"""The query router's pure parts: merging answers from devices, and checking what they send."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.node import DEVICE_REGISTRY
from actors.router import REQUEST, RESPONSE, BadResult, check_result, merge_results
from dmgn import api
from dmgn.config import config_from_json
from dmgn.errors import ConfigError


def result(memory_id: str, score: float, timestamp: int = 1) -> dict[str, Any]:
    return {
        "id": memory_id,
        "memory_id": memory_id,
        "type": "text",
        "timestamp": timestamp,
        "snippet": "s",
        "score": score,
    }


IDS = st.sampled_from([c * 64 for c in "0123456789abcdef"])
RESULTS = st.lists(st.builds(result, IDS, st.floats(0, 1), st.integers(0, 10**18)), max_size=20)


@given(st.lists(RESULTS, max_size=4), st.integers(1, 30), st.booleans())
def test_merged_answers_are_unique_ordered_and_within_the_limit(
    answers: list[list[dict[str, Any]]], limit: int, recent: bool
) -> None:
    merged = merge_results(answers, limit, recent=recent)
    ids = [r["id"] for r in merged]
    assert len(ids) == len(set(ids)) <= limit
    every = {r["id"] for answer in answers for r in answer}
    assert len(ids) == min(limit, len(every))
    if recent:
        times = [r["timestamp"] for r in merged]
        assert times == sorted(times)
    else:
        scores = [r["score"] for r in merged]
        assert scores == sorted(scores, reverse=True)
        for r in merged:  # the best score of each memory is kept
            assert r["score"] == max(x["score"] for a in answers for x in a if x["id"] == r["id"])


def test_a_duplicate_keeps_its_best_score() -> None:
    local = [result("a" * 64, 0.2), result("b" * 64, 0.5)]
    remote = [result("a" * 64, 0.9)]
    merged = merge_results([local, remote], 10, recent=False)
    assert [(r["id"][0], r["score"]) for r in merged] == [("a", 0.9), ("b", 0.5)]


@pytest.mark.parametrize(
    "bad",
    [
        "not a map",
        {**result("a" * 64, 0.5), "score": "high"},
        {**result("a" * 64, 0.5), "timestamp": True},
        {**result("A" * 64, 0.5)},
        {**result("a" * 63, 0.5)},
        {k: v for k, v in result("a" * 64, 0.5).items() if k != "timestamp"},
        {**result("a" * 64, float("nan"))},
    ],
)
def test_results_from_a_device_are_checked(bad: object) -> None:
    with pytest.raises(BadResult):
        check_result(bad)


def test_a_real_result_passes_and_the_wire_types_round_trip() -> None:
    good = result("a" * 64, 0.5) | {"vector_score": 0.1, "text_score": 1}
    assert check_result(good) == good
    # A newer device's extra field is dropped; a listing's result has no score.
    assert check_result({**good, "new_field": [1]}) == good
    listed = {k: v for k, v in good.items() if "score" not in k}
    assert check_result(listed) == listed
    request = api.QueryMemories(text="x", types=("text",), embedding=(0.5, 1.0))
    blob = msgpack.packb(request.to_wire(), use_bin_type=True)
    message = DEVICE_REGISTRY.decode(DEVICE_REGISTRY.encode(REQUEST(qid=7, request=blob)))
    assert api.request_from_wire(msgpack.unpackb(message.get_bytes("request"))) == request
    answer = RESPONSE(qid=7, results=[msgpack.packb(good)], code="truncated", error="cap")
    assert DEVICE_REGISTRY.decode(DEVICE_REGISTRY.encode(answer)).fields["code"] == "truncated"


@pytest.mark.parametrize("value", ["full", "recent:1", "recent:36500"])
def test_replica_policies_load(value: str) -> None:
    assert config_from_json({"replica": value}).replica == value


@pytest.mark.parametrize("value", ["recent", "recent:0", "recent:-1", "recent:x", "all", 3])
def test_bad_replica_policies_say_what_to_write(value: object) -> None:
    with pytest.raises(ConfigError, match="replica"):
        config_from_json({"replica": value})
