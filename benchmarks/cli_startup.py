"""`dmgn status` through a running daemon against bare Python start-up, hyperfine-style.

    .venv/bin/python benchmarks/cli_startup.py [--runs 20] [--out benchmarks/results]

Starts a daemon (hashing embedder, loopback, no mDNS) in a temporary data dir, then times,
after two warm-up runs each, ``--runs`` rounds in which every command runs once in turn (so
load drift hits all of them alike):

* ``python -c pass``: the floor (the same interpreter and site-packages);
* ``dmgn status --json`` and ``dmgn status``: the console script, which answers through the
  daemon without click, pydantic or rich (dmgn.app.daemon_cli);
* ``python -m dmgn.app.cli status --json``: the module form the tests use;
* the click CLI (``from dmgn.app.cli import main``), which is what every `dmgn status` ran
  before issue 17 (click, pydantic via dmgn.api and dmgn.config, the daemon spawning code).

Also records the modules each form imports and the largest import costs (``-X importtime``).
Writes cli_startup.json and cli_startup.md to --out (default benchmarks/out, gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
BIN = Path(sys.executable).parent
CLICK = "import sys; sys.argv[0] = 'dmgn'; from dmgn.app.cli import main; main()"


def run(
    cmd: list[str], env: dict[str, str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=check)


def commands(data_dir: Path) -> dict[str, list[str]]:
    dmgn = str(BIN / "dmgn")
    where = ["--data-dir", str(data_dir)]
    return {
        "python -c pass": [sys.executable, "-c", "pass"],
        "dmgn status --json": [dmgn, "status", *where, "--json"],
        "dmgn status (people)": [dmgn, "status", *where],
        "python -m dmgn.app.cli status --json": [
            sys.executable,
            "-m",
            "dmgn.app.cli",
            "status",
            *where,
            "--json",
        ],
        "click CLI status --json (before)": [
            sys.executable,
            "-c",
            CLICK,
            "status",
            *where,
            "--json",
        ],
    }


def import_costs(cmd: list[str], env: dict[str, str], top: int = 8) -> dict[str, Any]:
    """Modules imported and the largest cumulative import times (-X importtime)."""
    python, *rest = cmd
    if python != sys.executable:  # the console script: run its entry point the same way
        rest = ["-c", "from dmgn.app.daemon_cli import main; main()", *rest]
    done = run([sys.executable, "-X", "importtime", *rest], env)
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if cumulative.strip().isdigit():
            rows.append((int(cumulative), name[1:]))  # nested imports stay indented
    top_level = sorted(((us, n) for us, n in rows if not n.startswith(" ")), reverse=True)
    return {
        "modules_imported": len(rows),
        "largest_us": {name: us for us, name in top_level[:top]},
    }


def measure(root: Path, runs: int) -> dict[str, Any]:
    data_dir = root / "d"
    passphrase = root / "pass"
    passphrase.write_text("benchmark passphrase\n")
    env = {**os.environ, "DMGN_EMBEDDER": "hashing", "COLUMNS": "100"}
    env.pop("DMGN_DATA_DIR", None)
    dmgn = str(BIN / "dmgn")
    run([dmgn, "init", "--data-dir", str(data_dir), "--passphrase-file", str(passphrase)], env)
    config_path = data_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.update(listen_addr="ws://127.0.0.1:0", mdns=False)
    config_path.write_text(json.dumps(config))
    start = [dmgn, "start", "--data-dir", str(data_dir), "--passphrase-file", str(passphrase)]
    run([*start, "--timeout", "180"], env)
    try:
        cmds = commands(data_dir)
        for cmd in cmds.values():
            for _ in range(2):  # warm-up: page cache, .pyc files
                run(cmd, env)
        times: dict[str, list[float]] = {name: [] for name in cmds}
        load_before = os.getloadavg()
        for _ in range(runs):
            for name, cmd in cmds.items():
                began = time.perf_counter()
                done = run(cmd, env)
                times[name].append((time.perf_counter() - began) * 1000)
                if "status" in name:
                    assert "identity_id" in done.stdout, (name, done.stdout, done.stderr)
        load_after = os.getloadavg()
        costs = {name: import_costs(cmd, env) for name, cmd in cmds.items() if "status" in name}
    finally:
        run([dmgn, "stop", "--data-dir", str(data_dir), "--force"], env, check=False)
    rows = {
        name: {
            "mean_ms": round(statistics.fmean(t), 1),
            "stdev_ms": round(statistics.stdev(t), 1),
            "min_ms": round(min(t), 1),
            "p50_ms": round(statistics.median(t), 1),
            "runs": len(t),
        }
        for name, t in times.items()
    }
    floor = rows["python -c pass"]
    for row in rows.values():
        row["over_python_p50_ms"] = round(row["p50_ms"] - floor["p50_ms"], 1)
        row["over_python_mean_ms"] = round(row["mean_ms"] - floor["mean_ms"], 1)
        row["over_python_min_ms"] = round(row["min_ms"] - floor["min_ms"], 1)
    return {
        "command": f"python benchmarks/cli_startup.py --runs {runs}",
        "python": sys.version.split()[0],
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "goal_over_python_ms": 150,
        "times": rows,
        "imports": costs,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# CLI start-up: `dmgn status` through the daemon",
        "",
        f"`{results['command']}`, Python {results['python']}; load average "
        f"{results['load_average_before']} before, {results['load_average_after']} after "
        "(2 cores, shared). Every command ran once per round, rounds alternating, after two "
        "warm-up runs each. Goal: within 150 ms of `python -c pass`.",
        "",
        "| command | mean ms | ± stdev | min ms | p50 ms | p50 over python | min over python |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["times"].items():
        lines.append(
            f"| `{name}` | {row['mean_ms']} | {row['stdev_ms']} | {row['min_ms']} | "
            f"{row['p50_ms']} | {row['over_python_p50_ms']} | {row['over_python_min_ms']} |"
        )
    lines += [
        "",
        "## What each one imports (`python -X importtime`, one run)",
        "",
        "| command | modules | largest top-level imports (cumulative µs) |",
        "|---|---:|---|",
    ]
    for name, row in results["imports"].items():
        largest = ", ".join(f"{module} {us}" for module, us in row["largest_us"].items())
        lines.append(f"| `{name}` | {row['modules_imported']} | {largest} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dmgn-su-"))  # short: socket paths are limited
    try:
        results = measure(root, args.runs)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cli_startup.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "cli_startup.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
