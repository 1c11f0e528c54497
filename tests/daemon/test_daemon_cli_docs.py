"""docs/cli.md is the real `--help`, and is kept current."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests._deadlines import scaled

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gen_cli_docs.py"


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_cli_docs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_up_to_date(gen: ModuleType) -> None:
    assert gen.DOCS.read_text() == gen.render(), (
        "docs/cli.md is stale: run python scripts/gen_cli_docs.py"
    )


@pytest.mark.parametrize(
    ("module", "args", "command"),
    [("dmgn.app.cli", ["start"], "dmgn start"), ("dmgn.app.node", [], "dmgn-node")],
)
def test_cli_reference_matches_help_of_the_real_process(
    gen: ModuleType, module: str, args: list[str], command: str
) -> None:
    env = {**os.environ, "COLUMNS": str(gen.TERMINAL_COLUMNS)}
    done = subprocess.run(
        [sys.executable, "-m", module, *args, "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=True,
    )
    # The real process names itself after its module when run with -m; the docs use the
    # installed command names.
    real = done.stdout.replace(f"python -m {module}", command.split()[0])
    assert gen.section(command) == real.rstrip() + "\n"
