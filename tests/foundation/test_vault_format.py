"""The vault file: what a wrong passphrase, a corrupt or a tampered file do."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from dmgn.errors import InvalidInput, VaultCorrupt, WrongPassphrase
from dmgn.identity import (
    EXPORT_FORMAT,
    KdfParams,
    decrypt_seed,
    encrypt_seed,
    identity_id,
    new_seed,
)

FAST = KdfParams(t=1, m_kib=8, p=1)  # unit tests only; the CLI always uses the real cost
SRC = Path("identity.vault")


def test_round_trip_returns_the_same_seed() -> None:
    seed = new_seed()
    assert (
        decrypt_seed(encrypt_seed(seed, "correct horse", kdf=FAST), "correct horse", source=SRC)
        == seed
    )


def test_default_parameters_are_argon2id_t3_64mib_p4() -> None:
    document = json.loads(encrypt_seed(new_seed(), "correct horse"))
    assert document["kdf"]["name"] == "argon2id"
    assert (document["kdf"]["t"], document["kdf"]["m_kib"], document["kdf"]["p"]) == (3, 65536, 4)
    assert document["cipher"] == "xchacha20poly1305"


def test_wrong_passphrase_is_a_clear_error() -> None:
    data = encrypt_seed(new_seed(), "correct horse", kdf=FAST)
    with pytest.raises(WrongPassphrase, match=r"wrong passphrase for identity\.vault"):
        decrypt_seed(data, "battery staple", source=SRC)


def test_short_passphrase_is_refused() -> None:
    with pytest.raises(InvalidInput, match="at least 8 characters"):
        encrypt_seed(new_seed(), "short", kdf=FAST)


@pytest.mark.parametrize("cut", [0, 1, 10, 100, -3, -20])
def test_truncated_vault_is_reported_as_corrupt(cut: int) -> None:
    data = encrypt_seed(new_seed(), "correct horse", kdf=FAST)
    with pytest.raises((VaultCorrupt, WrongPassphrase)):
        decrypt_seed(data[:cut], "correct horse", source=SRC)


def test_lowering_the_kdf_cost_in_the_file_breaks_decryption() -> None:
    # The header is authenticated: an attacker who edits the parameters gains nothing.
    document = json.loads(encrypt_seed(new_seed(), "correct horse", kdf=KdfParams(1, 16, 1)))
    document["kdf"]["m_kib"] = 8
    with pytest.raises(WrongPassphrase):
        decrypt_seed(json.dumps(document).encode(), "correct horse", source=SRC)


def test_flipped_ciphertext_byte_is_detected() -> None:
    document = json.loads(encrypt_seed(new_seed(), "correct horse", kdf=FAST))
    body = bytearray(base64.b64decode(document["ciphertext"]))
    body[-1] ^= 1
    document["ciphertext"] = base64.b64encode(body).decode()
    with pytest.raises(WrongPassphrase, match="or the file was altered"):
        decrypt_seed(json.dumps(document).encode(), "correct horse", source=SRC)


def test_absurd_kdf_parameters_are_rejected_before_running_argon2() -> None:
    document = json.loads(encrypt_seed(new_seed(), "correct horse", kdf=FAST))
    document["kdf"]["m_kib"] = 1 << 40
    with pytest.raises(VaultCorrupt, match="out of range"):
        decrypt_seed(json.dumps(document).encode(), "correct horse", source=SRC)


def test_export_file_is_not_accepted_as_a_vault() -> None:
    data = encrypt_seed(new_seed(), "correct horse", fmt=EXPORT_FORMAT, kdf=FAST)
    with pytest.raises(VaultCorrupt, match="expected 'dmgn-vault'"):
        decrypt_seed(data, "correct horse", source=SRC)


def test_vault_contains_no_key_material_in_clear() -> None:
    seed = new_seed()
    data = encrypt_seed(seed, "correct horse", kdf=FAST)
    assert seed not in data and seed.hex().encode() not in data
    assert base64.b64encode(seed) not in data
    assert identity_id(seed).encode() in data  # the public id is meant to be readable
