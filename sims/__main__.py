"""``python -m sims``: run the scenarios, write JSON and PNG plots.

python -m sims                      # every scenario, seed 1, into ./sims-out/
python -m sims partition_heal --seed 7 --out /tmp/run
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import trio
import trio.testing

from sims.plots import plot_result
from sims.scenarios import SCENARIOS, ScenarioResult

#: Real seconds all tasks must be idle before virtual time jumps. Not zero: the store and
#: indexer do their work in worker threads, and the clock must not run ahead while they do.
AUTOJUMP_THRESHOLD = 0.03


def run_scenario(name: str, seed: int) -> ScenarioResult:
    clock = trio.testing.MockClock(autojump_threshold=AUTOJUMP_THRESHOLD)
    result: ScenarioResult = trio.run(lambda: SCENARIOS[name](seed=seed), clock=clock)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sims",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, []], default=[])
    parser.add_argument("--seed", type=int, default=1)
    # Not sims/results/: those are the committed results; a run replaces them only when asked
    # (--out sims/results).
    parser.add_argument("--out", type=Path, default=Path("sims-out"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {}
    for name in args.scenarios or list(SCENARIOS):
        started = time.perf_counter()
        result = run_scenario(name, args.seed)
        real = time.perf_counter() - started
        document = {**result.to_json(), "real_seconds": round(real, 2)}
        (args.out / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n")
        plot_result(result, args.out / f"{name}.png")
        summary[name] = {**result.metrics, "real_seconds": round(real, 2)}
        print(f"{name}: {json.dumps(result.metrics)} ({real:.1f}s real)")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
