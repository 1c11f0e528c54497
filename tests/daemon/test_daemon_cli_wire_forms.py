"""dmgn.app.daemon_cli: the command lines it answers without click, the wire dicts it sends
(equal to what dmgn.api builds for the same command line), and the rich-free status output."""

from __future__ import annotations

import datetime as dt
import io
from typing import Any

import msgpack
import pytest

from dmgn import api
from dmgn.app import render_plain
from dmgn.app.daemon_cli import CommandLine, parse, wire_request
from dmgn.errors import InvalidInput


def sent(argv: list[str]) -> dict[str, Any]:
    line = parse(argv)
    assert line is not None, argv
    wire: dict[str, Any] = msgpack.unpackb(msgpack.packb(wire_request(line)))
    return wire


def as_api(request: api.ApiRequest) -> dict[str, Any]:
    wire: dict[str, Any] = msgpack.unpackb(msgpack.packb(request.to_wire()))
    return wire


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["status"], api.Status()),
        (["status", "--json", "--data-dir", "/x"], api.Status()),
        (["peers", "--passphrase-file=/p"], api.Peers()),
        (["get", "abc123"], api.GetMemory(id="abc123")),
        (["query", "dogs"], api.QueryMemories(text="dogs")),
        (["query", "--recent"], api.QueryMemories(recent=True)),
        (
            [
                "query",
                "--limit",
                "3",
                "dogs and cats",
                "--type",
                "text",
                "--type=document",
                "--alpha",
                "0.5",
                "--full",
                "--links-of",
                "abc",
                "--after",
                "1000",
                "--before",
                "2026-01-31",
                "--json",
            ],
            api.QueryMemories(
                text="dogs and cats",
                limit=3,
                types=("text", "document"),
                alpha=0.5,
                include_content=True,
                links_of="abc",
                after=1000,
                before=int(dt.datetime(2026, 1, 31).timestamp() * 1e9),
            ),
        ),
        (["query", "x", "--limit", "5", "--limit", "7"], api.QueryMemories(text="x", limit=7)),
    ],
)
def test_the_wire_dict_is_what_the_api_request_sends(argv: list[str], expected: Any) -> None:
    assert sent(argv) == as_api(expected)
    assert api.request_from_wire(sent(argv)) == expected  # and the daemon reads it back so


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["add", "text"],
        ["status", "--help"],
        ["status", "-h"],
        ["status", "extra"],
        ["status", "--verbose"],
        ["status", "--json=1"],
        ["status", "--data-dir"],
        ["status", "--data-dir", ""],
        ["status", "--data-dir", "--json"],
        ["get"],
        ["get", "a", "b"],
        ["query", "a", "b"],
        ["query", "--", "-x"],
        ["query", "-x"],
        ["query", "dogs", "--limit"],
        ["get", "bad\udcff"],
        ["--version"],
    ],
)
def test_other_command_lines_are_left_to_click(argv: list[str]) -> None:
    assert parse(argv) is None


@pytest.mark.parametrize(
    "argv",
    [
        ["query", "x", "--limit", "many"],
        ["query", "x", "--alpha", "?"],
        ["query", "--type", "poem"],
    ],
)
def test_values_click_refuses_are_left_to_click(argv: list[str]) -> None:
    line = parse(argv)
    assert line is not None
    with pytest.raises(Exception) as caught:
        wire_request(line)
    assert type(caught.value).__name__ == "_NotOurs"


def test_the_full_clis_own_checks_come_first() -> None:
    with pytest.raises(InvalidInput, match="is not a time like"):
        wire_request(CommandLine("query", ["x"], values={"--after": "yesterday"}))


STATUS: dict[str, Any] = {
    "identity_id": "9" * 64,
    "mode": "daemon",
    "listen_addrs": ["ws://127.0.0.1:1", "ws://[::1]:2"],
    "api_urls": [],
    "last_error": None,
    "index": {"memories": 3, "backend": "numpy"},
    "note": "word " * 30,
    "metrics": {"hidden": 1},
    "sync": {
        "device_id": "a" * 32,
        "feed_entries": 4,
        "vector": {"a" * 32: 3, "b" * 32: 1},
        "devices": [
            {
                "device_id": "b" * 32,
                "connected": True,
                "behind_us": 2,
                "ahead_of_us": 0,
                "in_sync": False,
                "last_sync_s_ago": 125.0,
            }
        ],
        "last_apply_error": "op 7 refused",
    },
}


def test_status_for_people_without_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    out = io.StringIO()
    render_plain.render_status(STATUS, out)
    lines = out.getvalue().splitlines()
    assert lines[:5] == [
        "identity_id   " + "9" * 64,
        "mode          daemon",
        "listen_addrs  ws://127.0.0.1:1, ws://[::1]:2",
        "api_urls      -",
        "last_error    -",
    ]
    assert lines[5:8] == ["index", "  memories  3", "  backend   numpy"]
    # a long value wraps under itself, within 80 columns
    note = [line for line in lines if line.startswith("note")]
    assert note and all(len(line) <= 80 for line in lines)
    following = lines[lines.index(note[0]) + 1]
    assert following.startswith(" " * 14 + "word")
    assert "hidden" not in out.getvalue()  # metrics are for programs
    assert lines[-5] == "sync  4 feed entries; our vector:"
    # columns line up under their headers
    assert lines[-4].index("our copy") == lines[-3].index(" 3 ") + 1 == lines[-2].index(" 1 ") + 1
    assert lines[-4].split() == [
        "device",
        "our",
        "copy",
        "(seq)",
        "connected",
        "lag",
        "last",
        "sync",
    ]
    assert lines[-3].split() == ["aaaaaaaaaaaa", "(this", "device)", "3", "-", "-", "-"]
    assert lines[-2].split() == ["bbbbbbbbbbbb", "1", "yes", "lacks", "2", "2m", "ago"]
    assert lines[-1] == "last apply error: op 7 refused"
    assert "\x1b[" not in out.getvalue()  # no styling when the output is no terminal


def test_status_for_people_is_bold_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "120")
    out = io.StringIO()
    render_plain.render_status({"mode": "daemon", "index": {"memories": 1}}, out)
    assert out.getvalue().splitlines()[:2] == ["\x1b[1mmode\x1b[0m  daemon", "\x1b[1mindex\x1b[0m"]
