"""Identity and the vault file format.

An identity is an ed25519 key pair; its public key (64 lowercase hex chars) is the identity id.
The vault file keeps the 32-byte seed encrypted:

    key  = Argon2id(passphrase, salt, t, m, p)          parameters stored in the file
    body = XChaCha20-Poly1305(key, seed, aad=header)    the header is authenticated too

The header (format, version, KDF parameters, identity id) is bound as associated data, so changing
any of it - lowering the KDF cost, swapping the identity id - makes decryption fail instead of
silently weakening or confusing the vault. An exported identity uses the same format with another
``format`` tag, so a backup can never be mistaken for a live vault or the other way round.

Everything derived from the seed (master key, index key, Noise static key) is derived here by
HKDF with distinct labels; only the vault actor ever holds a seed.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey

from dmgn.crypto import DecryptionFailed, argon2id, hkdf_sha256, random_bytes, seal, unseal
from dmgn.errors import InvalidInput, VaultCorrupt, WrongPassphrase
from dmgn.paths import write_private

VAULT_FORMAT = "dmgn-vault"
EXPORT_FORMAT = "dmgn-identity-export"
VAULT_VERSION = 1
MIN_PASSPHRASE_CHARS = 8

#: Argon2id cost: t=3 passes over 64 MiB with 4 lanes, as the reference. About 0.3 s on a
#: 2-core machine: slow enough to make guessing expensive, fast enough for every unlock.
ARGON2_T = 3
ARGON2_M_KIB = 64 * 1024
ARGON2_P = 4
#: Bounds accepted when reading a file: a tampered file must not be able to make us allocate
#: terabytes (or accept a trivially weak cost without us noticing).
_MAX_M_KIB = 4 * 1024 * 1024
_MAX_T = 64


@dataclass(frozen=True, slots=True)
class KdfParams:
    t: int = ARGON2_T
    m_kib: int = ARGON2_M_KIB
    p: int = ARGON2_P


def check_passphrase(passphrase: str) -> None:
    if len(passphrase) < MIN_PASSPHRASE_CHARS:
        raise InvalidInput(f"the passphrase must have at least {MIN_PASSPHRASE_CHARS} characters")


def identity_id(seed: bytes) -> str:
    return bytes(SigningKey(seed).verify_key).hex()


def master_key(seed: bytes) -> bytes:
    return hkdf_sha256(seed, b"dmgn master")


def derived_key(seed: bytes, purpose: str) -> bytes:
    """A key for one purpose (``index``, ``noise-static:<device>``...), independent of the rest."""
    return hkdf_sha256(master_key(seed), b"dmgn derived:" + purpose.encode())


def new_seed() -> bytes:
    return random_bytes(32)


def _header(fmt: str, kdf: KdfParams, salt: bytes, ident: str) -> dict[str, Any]:
    return {
        "format": fmt,
        "version": VAULT_VERSION,
        "kdf": {
            "name": "argon2id",
            "t": kdf.t,
            "m_kib": kdf.m_kib,
            "p": kdf.p,
            "salt": base64.b64encode(salt).decode(),
        },
        "cipher": "xchacha20poly1305",
        "identity_id": ident,
    }


def _aad(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def encrypt_seed(
    seed: bytes, passphrase: str, *, fmt: str = VAULT_FORMAT, kdf: KdfParams | None = None
) -> bytes:
    """Serialize an encrypted vault (or export) file's bytes."""
    check_passphrase(passphrase)
    kdf = kdf or KdfParams()
    salt = random_bytes(16)
    header = _header(fmt, kdf, salt, identity_id(seed))
    key = argon2id(passphrase.encode(), salt, t=kdf.t, m_kib=kdf.m_kib, p=kdf.p)
    body = seal(key, seed, _aad(header))
    document = dict(header, ciphertext=base64.b64encode(body).decode())
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def decrypt_seed(data: bytes, passphrase: str, *, source: Path, fmt: str = VAULT_FORMAT) -> bytes:
    """Open a vault (or export) file's bytes; raise a clear error for each way it can fail."""
    header, body = _parse(data, source, fmt)
    kdf = header["kdf"]
    salt = base64.b64decode(kdf["salt"])
    key = argon2id(passphrase.encode(), salt, t=kdf["t"], m_kib=kdf["m_kib"], p=kdf["p"])
    try:
        seed = unseal(key, body, _aad(header))
    except DecryptionFailed:
        raise WrongPassphrase(
            f"wrong passphrase for {source} (or the file was altered); try again, or restore "
            f"an exported identity with `dmgn import`"
        ) from None
    if len(seed) != 32 or identity_id(seed) != header["identity_id"]:
        raise VaultCorrupt(f"{source} decrypts to an invalid identity; restore with `dmgn import`")
    return seed


def read_identity_id(data: bytes, *, source: Path, fmt: str = VAULT_FORMAT) -> str:
    """The public identity id from a vault file, without the passphrase."""
    header, _ = _parse(data, source, fmt)
    return str(header["identity_id"])


def _parse(data: bytes, source: Path, fmt: str) -> tuple[dict[str, Any], bytes]:
    corrupt = f"{source} is not a readable dmgn {'vault' if fmt == VAULT_FORMAT else 'export'} file"
    try:
        document = json.loads(data)
        if not isinstance(document, dict):
            raise ValueError("not an object")
        if document.get("format") != fmt:
            other = document.get("format")
            raise VaultCorrupt(f"{source} is a {other!r} file, expected {fmt!r}")
        if document.get("version") != VAULT_VERSION:
            raise VaultCorrupt(
                f"{source} has vault version {document.get('version')!r}; this dmgn reads "
                f"version {VAULT_VERSION}"
            )
        kdf_doc = document["kdf"]
        kdf = KdfParams(t=int(kdf_doc["t"]), m_kib=int(kdf_doc["m_kib"]), p=int(kdf_doc["p"]))
        if kdf_doc.get("name") != "argon2id" or document.get("cipher") != "xchacha20poly1305":
            raise ValueError("unknown algorithm")
        if not (1 <= kdf.t <= _MAX_T and 8 <= kdf.m_kib <= _MAX_M_KIB and 1 <= kdf.p <= 64):
            raise ValueError("KDF parameters out of range")
        salt = base64.b64decode(kdf_doc["salt"], validate=True)
        ident = str(document["identity_id"])
        if len(ident) != 64 or any(c not in "0123456789abcdef" for c in ident):
            raise ValueError("bad identity id")
        body = base64.b64decode(document["ciphertext"], validate=True)
    except VaultCorrupt:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise VaultCorrupt(f"{corrupt} ({error}); restore with `dmgn import`") from None
    return _header(fmt, kdf, salt, ident), body


def write_vault(path: Path, data: bytes) -> None:
    write_private(path, data)


def load_or_create_device_id(path: Path) -> bytes:
    """A random 16-byte device id, stable for one data dir (not secret)."""
    if path.exists():
        try:
            document = json.loads(path.read_text())
            device = bytes.fromhex(document["device_id"])
            if len(device) == 16:
                return device
        except (ValueError, KeyError, TypeError):
            pass
        raise VaultCorrupt(f"{path} is unreadable; delete it to give this node a new device id")
    device = os.urandom(16)
    write_private(path, (json.dumps({"device_id": device.hex()}) + "\n").encode())
    return device
