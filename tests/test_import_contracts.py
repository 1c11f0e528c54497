"""The layer contracts catch what they exist for (issue 31, item 2).

They listed modules by name and skipped imports under ``TYPE_CHECKING``, so a new
``actors/newactor.py`` importing the store, gossip and the service passed all of them, and so did
a leaf actor importing another leaf "for types". Each case is tried on a copy of the packages:
`lint-imports` must fail on it and name the contract that caught it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter not installed")


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for package in ("wire", "dmgn", "actors", "sims"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def test_a_new_actor_in_no_layer_is_refused(tree: Path) -> None:
    (tree / "actors" / "newactor.py").write_text(
        "from actors import gossip, service, store\n\nUSED = (gossip, service, store)\n"
    )
    done = _lint(tree)
    assert done.returncode != 0
    assert "actors.newactor" in done.stdout
    assert "every module of actors/ has its layer" in done.stdout


def test_a_leaf_importing_a_leaf_for_types_only_is_refused(tree: Path) -> None:
    vault = tree / "actors" / "vault.py"
    vault.write_text(
        vault.read_text()
        + "\n\nfrom typing import TYPE_CHECKING\n\n"
        + "if TYPE_CHECKING:\n    from actors import store\n"
    )
    done = _lint(tree)
    assert done.returncode != 0
    assert "actors.vault -> actors.store" in done.stdout
