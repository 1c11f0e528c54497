"""``python -m sims``: run declarative scenarios of many nodes in one process.

python -m sims list                                  # the scenarios in sims/scenarios/
python -m sims run churn                             # seed 1, into ./sims-out/churn/
python -m sims run large --nodes 500 --seed 7 --out /tmp/run

Writes ``metrics.json`` (deterministic for a seed: virtual time and counts only),
``resources.json`` (real seconds, CPU seconds, peak memory) and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import trio
import trio.testing

from sims import engine
from sims.collector import few_collections
from sims.determinism import deterministic


def run_scenario(scenario: engine.Scenario, seed: int) -> dict[str, Any]:
    """Run ``scenario`` in virtual time under :func:`sims.determinism.deterministic`: the same
    seed gives the same document (with the collector tuned for a big heap,
    :func:`sims.collector.few_collections`)."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    with deterministic(seed), few_collections():
        document: dict[str, Any] = trio.run(lambda: engine.run(scenario, seed), clock=clock)
    return document


def _list(as_json: bool) -> None:
    rows = [engine.load(name) for name in engine.available()]
    if as_json:
        print(
            json.dumps(
                [{"name": s.name, "nodes": s.nodes, "description": s.description} for s in rows]
            )
        )
        return
    for s in rows:
        print(f"{s.name:16} {s.nodes:4} nodes  {s.minutes:g} min  {s.description}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("PYTHONHASHSEED") != "0":
        # Set and dict orders of str keys depend on the hash seed; fix it so two processes
        # with one scenario seed run the same schedule.
        os.execve(
            sys.executable,
            [sys.executable, "-m", "sims", *argv],
            {**os.environ, "PYTHONHASHSEED": "0"},
        )
    parser = argparse.ArgumentParser(
        prog="python -m sims",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the scenarios and what each shows")
    listing.add_argument("--json", action="store_true")
    running = commands.add_parser("run", help="run one scenario")
    running.add_argument("scenario", help="a name from `python -m sims list` or a .toml path")
    running.add_argument(
        "--nodes", type=int, help="total nodes (identities scale, storage in proportion)"
    )
    running.add_argument("--seed", type=int, default=1)
    running.add_argument("--minutes", type=float, help="virtual minutes of workload")
    running.add_argument("--out", type=Path, help="output folder (default ./sims-out/SCENARIO)")
    running.add_argument("--no-plots", action="store_true")
    running.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    if args.command == "list":
        _list(args.json)
        return
    logging.basicConfig(level=logging.ERROR)
    scenario = engine.load(args.scenario)
    if args.nodes:
        scenario = scenario.scaled(args.nodes)
    if args.minutes:
        scenario = engine._replace(scenario, minutes=args.minutes)
    out: Path = args.out or Path("sims-out") / scenario.name
    out.mkdir(parents=True, exist_ok=True)
    started, cpu = time.perf_counter(), time.process_time()
    document = run_scenario(scenario, args.seed)
    resources = {
        "real_seconds": round(time.perf_counter() - started, 2),
        "cpu_seconds": round(time.process_time() - cpu, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "nodes": scenario.nodes,
    }
    (out / "metrics.json").write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    (out / "resources.json").write_text(json.dumps(resources, indent=1) + "\n")
    if not args.no_plots:
        from sims.plots import plot_run

        plot_run(document, resources, out)
    summary = {
        "scenario": scenario.name,
        "nodes": scenario.nodes,
        "converged": document["converged"],
        "ops": document["ops"]["total"],
        "convergence_p50_s": document["convergence_s"]["p50"],
        "convergence_p99_s": document["convergence_s"]["p99"],
        "gossip_messages_per_op": document["gossip"]["messages_per_op"],
        "anti_entropy_messages_per_op": document["gossip"]["anti_entropy_messages_per_op"],
        "wire_messages_per_op": document["gossip"]["wire_messages_per_op"],
        "flooding_messages_per_op": document["gossip"]["flooding_messages_per_op"],
        "shards": document["shards"]["final"],
        "restores": document["restores"],
        "restore_success": document["restore_success"],
        "never_together": document["never_together"],
        "malicious": {k: v for k, v in document["malicious"].items() if k != "attacks"}
        | (
            {"attacks": document["malicious"]["attacks"]["by_kind"]}
            if document["malicious"]
            else {}
        ),
        "stores_hold_the_ops_made": document["stores"]["holds_the_ops_made"],
        "every_memory_durable_or_reported_lost": document["shards"][
            "every_memory_durable_or_reported_lost"
        ],
        **resources,
        "out": str(out),
    }
    print(json.dumps(summary, indent=None if args.json else 1))


if __name__ == "__main__":
    main()
