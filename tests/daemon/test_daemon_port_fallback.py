"""`dmgn init && dmgn start` from the README on a machine where port 4001 is taken and another
dmgn node runs: the node picks a free port and says so; an address the user chose stays strict.

The default config listens on every interface with mDNS on, so the scenario runs inside a
network namespace it creates (``unshare -rn``): loopback only, no port shared with the machine.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

SCENARIO = Path(__file__).with_name("netns_first_run.py")


def _namespace_problem() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare(1) and ip(8) to make a private network namespace"
    probe = subprocess.run(
        ["unshare", "-rn", "ip", "link", "set", "lo", "up"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"cannot create a network namespace here (unshare -rn: {probe.stderr.strip()})"
    return None


@pytest.fixture(scope="module")
def first_run() -> dict[str, Any]:
    problem = _namespace_problem()
    if problem is not None:
        pytest.skip(problem)
    done = subprocess.run(
        [
            "unshare",
            "-rn",
            "sh",
            "-c",
            'ip link set lo up && exec "$0" "$1"',
            sys.executable,
            str(SCENARIO),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return report


def _port(address: str) -> int:
    match = re.fullmatch(r"ws://[^/]+:(\d+)", address)
    assert match, address
    return int(match.group(1))


def test_readme_start_falls_back_to_a_free_port_and_says_so(first_run: dict[str, Any]) -> None:
    other = first_run["other_start"]
    assert other["rc"] == 0, other["err"]
    assert first_run["init"]["rc"] == 0, first_run["init"]["err"]
    start = first_run["start"]
    assert start["rc"] == 0, start["err"]
    assert "ws://0.0.0.0:4001 is in use" in start["out"]
    assert "Set listen_addr in config.json" in start["out"]
    # The port we got is the one recorded for other devices, and the node works on it.
    addrs = first_run["config"]["node_addrs"]
    assert addrs and all(_port(a) not in (0, 4001) for a in addrs)
    assert json.loads(first_run["status"]["out"])["listen_addrs"] == addrs
    assert first_run["config"]["listen_addr"] is None  # still "automatic" for the next start
    added = json.loads(first_run["add"]["out"])["id"]
    assert [h["id"] for h in json.loads(first_run["query"]["out"])["results"]] == [added]
    assert first_run["stop"]["rc"] == 0 and first_run["other_stop"]["rc"] == 0


def test_an_address_the_user_chose_stays_strict_and_the_error_suggests_a_free_port(
    first_run: dict[str, Any],
) -> None:
    strict = first_run["strict_start"]
    assert strict["rc"] == 7, strict
    message = strict["err"]
    assert message.startswith("dmgn: ") and len(message.strip().splitlines()) == 1
    assert "cannot listen on ws://127.0.0.1:4001: Address already in use" in message
    suggested = re.search(r"e\.g\. (ws://\S+?),", message)
    assert suggested, message
    assert suggested.group(1).startswith("ws://127.0.0.1:")  # the configured host, not 0.0.0.0
    assert _port(suggested.group(1)) != 4001


def test_the_tests_pass_with_the_port_taken_and_nodes_running(first_run: dict[str, Any]) -> None:
    assert first_run["pytest"]["rc"] == 0, first_run["pytest"]["out"]
    assert re.search(r"\d+ passed", first_run["pytest"]["out"])
