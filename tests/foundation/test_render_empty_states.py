"""What people read when there is nothing to list yet: `dmgn peers` with no peers says whether
the daemon runs (only a running daemon reports a discovery section), and `dmgn status` with no
feed entries says so instead of printing an empty table's headers."""

from __future__ import annotations

import io

from rich.console import Console

from dmgn.app import render_plain
from dmgn.app.render import render


def peers_text(response: dict[str, object]) -> str:
    out = io.StringIO()
    render(Console(file=out, width=100, color_system=None), "peers", response)
    return out.getvalue()


def test_no_peers_through_a_running_daemon_does_not_ask_whether_it_runs() -> None:
    text = peers_text({"peers": [], "discovery": {"enabled": True}})
    assert "No peers yet" in text and "not running" not in text


def test_no_peers_offline_says_the_daemon_is_not_running() -> None:
    text = peers_text({"peers": []})
    assert "the daemon is not running" in text and "dmgn start" in text


def test_status_with_no_feed_entries_prints_no_empty_table() -> None:
    out = io.StringIO()
    status = {
        "mode": "daemon",
        "sync": {"feed_entries": 0, "vector": {}, "devices": [], "device_id": "ab" * 16},
    }
    render_plain.render_status(status, out)
    lines = out.getvalue().splitlines()
    assert lines[-1] == "no feed entries or devices yet"
    assert not any(line.split()[:1] == ["device"] for line in lines)
