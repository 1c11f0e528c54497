"""The official SLIP-39 test vectors through dmgn's import path.

The vectors are copied from the reference implementation (see slip39_vectors.md for the source
commit); the `shamir-mnemonic` wheel does not ship them. Valid sets must decode to the expected
master secret with the passphrase "TREZOR"; every invalid set must be refused by our checks (on
entry of a share, or when combining), never decoded to something.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from dmgn.app.cli import main
from dmgn.identity import identity_id
from dmgn.recovery import NotEnoughShares, Recovery, ShareRejected

VECTORS: list[list[Any]] = json.loads((Path(__file__).parent / "slip39_vectors.json").read_text())
VALID = [v for v in VECTORS if v[2]]
INVALID = [v for v in VECTORS if not v[2]]


def test_the_copy_is_the_whole_official_set() -> None:
    data = (Path(__file__).parent / "slip39_vectors.json").read_bytes()
    # sha256 of vectors.json at trezor/python-shamir-mnemonic@17fcce1 (byte-for-byte copy).
    assert hashlib.sha256(data).hexdigest() == (
        "13ebecebdd869dd2bc2cdf69e7ce3a158cf106cac76c39d17682b1c6cdabbdc4"
    )
    assert len(VECTORS) == 45
    assert len(VALID) == 15 and len(INVALID) == 30


@pytest.mark.parametrize("vector", VALID, ids=[v[0] for v in VALID])
def test_valid_vector_decodes_to_its_master_secret(vector: list[Any]) -> None:
    _, mnemonics, secret_hex, _ = vector
    recovery = Recovery()
    for mnemonic in mnemonics:
        recovery.add(mnemonic)
    assert recovery.progress().complete
    assert recovery.master_secret("TREZOR") == bytes.fromhex(secret_hex)


@pytest.mark.parametrize("vector", INVALID, ids=[v[0] for v in INVALID])
def test_invalid_vector_is_refused(vector: list[Any]) -> None:
    _, mnemonics, _, _ = vector
    recovery = Recovery()
    with pytest.raises((ShareRejected, NotEnoughShares)):
        for mnemonic in mnemonics:
            recovery.add(mnemonic)
        recovery.master_secret("TREZOR")


def _import_files(tmp_path: Path, mnemonics: list[str]) -> Any:
    files = []
    for i, mnemonic in enumerate(mnemonics):
        path = tmp_path / f"share-{i}.txt"
        path.write_text(f"# vector share\n{mnemonic}\n")
        files.append(str(path))
    (tmp_path / "share-pass").write_text("TREZOR\n")
    return CliRunner().invoke(
        main,
        ["import", "--shares", *files, "--share-passphrase-file", str(tmp_path / "share-pass")],
        env={"DMGN_DATA_DIR": str(tmp_path / "node"), "DMGN_PASSPHRASE": "vault passphrase"},
    )


@pytest.mark.parametrize(
    "vector",
    [v for v in VALID if len(v[2]) == 64],
    ids=[v[0] for v in VALID if len(v[2]) == 64],
)
def test_valid_256_bit_vector_imports_as_that_identity(vector: list[Any], tmp_path: Path) -> None:
    result = _import_files(tmp_path, vector[1])
    assert result.exit_code == 0, result.output
    assert identity_id(bytes.fromhex(vector[2])) in result.output


def test_valid_128_bit_vector_is_not_taken_for_an_identity(tmp_path: Path) -> None:
    vector = next(v for v in VALID if len(v[2]) == 32)
    result = _import_files(tmp_path, vector[1])
    assert result.exit_code == 2
    assert "16-byte secret, not a dmgn identity" in result.output
    assert not (tmp_path / "node" / "identity.vault").exists()
