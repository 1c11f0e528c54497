"""Running the sims or a benchmark with no options leaves the committed results alone: output
goes to a gitignored folder (``./sims-out``, ``benchmarks/out``) unless ``--out`` says where."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NO_PLOTS = ["--no-plots"]


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_python_m_sims_without_out_writes_to_sims_out_in_the_current_folder(
    tmp_path: Path,
) -> None:
    committed = _digests(REPO / "docs" / "sims")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "sims",
            "run",
            "steady",
            "--nodes",
            "6",
            "--minutes",
            "1",
            "--no-plots",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert json.loads((tmp_path / "sims-out" / "steady" / "metrics.json").read_text())["ops"]
    assert _digests(REPO / "docs" / "sims") == committed


def test_a_benchmark_without_out_leaves_benchmarks_results_alone() -> None:
    committed = _digests(REPO / "benchmarks" / "results")
    out = REPO / "benchmarks" / "out" / "wire.json"
    out.unlink(missing_ok=True)
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "wire.py"), "--quick"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert json.loads(out.read_text())["throughput"]
    assert _digests(REPO / "benchmarks" / "results") == committed
    if not (REPO / ".git").exists():
        return  # not a git checkout: nothing can be overwritten in a commit
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(out)], cwd=REPO, capture_output=True, check=False
    )
    assert ignored.returncode == 0, "benchmarks/out must be gitignored"
