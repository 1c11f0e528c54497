"""`dmgn add --jsonl`: many memories at once, bad lines reported by number, --strict."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.foundation.test_cli_offline import dmgn, dmgn_json


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DMGN_EMBEDDER", os.environ.get("DMGN_EMBEDDER", "hashing"))
    path = tmp_path / "node"
    dmgn(path, "init")
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_import_adds_every_good_line_and_names_the_bad_ones(data_dir: Path, tmp_path: Path) -> None:
    anchor = dmgn_json(data_dir, "add", "the anchor memory")
    good = [json.dumps({"content": f"chat line {i} about sailing"}) for i in range(600)]
    lines = [
        *good[:300],
        "this is not json",
        json.dumps({"content": 7}),
        "",
        json.dumps({"content": "linked to the anchor", "links": [anchor["id"][:10]]}),
        json.dumps({"content": "linked to nothing", "links": ["0123456789ab"]}),
        json.dumps(["a", "list"]),
        json.dumps({"content": "a fact", "type": "observation", "metadata": {"src": "chat"}}),
        *good[300:],
    ]
    source = write_lines(tmp_path / "history.jsonl", lines)
    summary = dmgn_json(data_dir, "add", "--jsonl", str(source))
    assert summary["added"] == 602 and summary["lines"] == len(lines)
    assert [p["line"] for p in summary["failed"]] == [301, 302, 305, 306]
    assert summary["failed"][0]["error"].startswith("line 301: not a JSON object")
    assert "content" in summary["failed"][1]["error"]
    assert "0123456789ab" in summary["failed"][2]["error"]
    status = dmgn_json(data_dir, "status")
    assert status["memories"] == 603 and status["index"]["memories"] == 603
    hits = dmgn_json(data_dir, "query", "a fact", "--type", "observation")
    assert hits["results"][0]["snippet"] == "a fact"
    graph = dmgn_json(data_dir, "graph", anchor["id"])
    assert len(graph["nodes"]) == 2

    # People get a summary with the bad lines, not JSON.
    shown = dmgn(data_dir, "add", "--jsonl", str(write_lines(tmp_path / "b.jsonl", lines[298:302])))
    assert "Imported 2 memories" in shown.stdout
    assert "line 3: not a JSON object" in shown.stdout and "line 4:" in shown.stdout


def test_strict_imports_nothing_when_a_line_is_bad(data_dir: Path, tmp_path: Path) -> None:
    lines = [json.dumps({"content": f"note {i}"}) for i in range(10)]
    lines.insert(6, json.dumps({"content": "x", "type": "poem"}))
    source = write_lines(tmp_path / "notes.jsonl", lines)
    failed = dmgn(data_dir, "add", "--jsonl", str(source), "--strict", check=False)
    assert failed.returncode != 0
    assert failed.stderr.strip().startswith("dmgn: line 7:") and "type" in failed.stderr
    assert dmgn_json(data_dir, "status")["memories"] == 0
    missing = dmgn(data_dir, "add", "--jsonl", str(tmp_path / "nope.jsonl"), check=False)
    assert missing.returncode != 0 and "is not a file" in missing.stderr
    both = dmgn(data_dir, "add", "text", "--jsonl", str(source), check=False)
    assert both.returncode != 0 and "--jsonl takes the memories from the file" in both.stderr


def test_requests_are_pipelined_two_at_a_time_and_answered_in_order() -> None:
    import threading

    from dmgn import api
    from dmgn.app.bulk import send_pipelined
    from dmgn.errors import DaemonUnavailable

    lock = threading.Lock()
    running, most = 0, 0
    both_in_flight = threading.Barrier(2, timeout=30)

    def send(request: api.AnyRequest) -> dict[str, object]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        assert isinstance(request, api.AddMemory)
        if request.content in ("0", "1"):
            both_in_flight.wait()  # the second is sent before the first is answered
        with lock:
            running -= 1
        if request.content == "5":
            raise DaemonUnavailable("the daemon stopped in the middle")
        return {"content": request.content}

    answers: list[object] = []
    requests = (api.AddMemory(content=str(i)) for i in range(8))
    with pytest.raises(DaemonUnavailable):
        send_pipelined(send, requests, lambda response: answers.append(response["content"]))
    assert answers == ["0", "1", "2", "3", "4"]  # in order, and nothing after the failure
    assert most == 2
