"""The REST API token file: made private, refused when others can read it, re-read on rotation."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from actors.rest import TokenFile
from dmgn.api_token import create_token, ensure_token, read_token
from dmgn.errors import ConfigError, NotInitialized


def test_a_new_token_is_private_and_well_formed(tmp_path: Path) -> None:
    path = tmp_path / "api.token"
    token = create_token(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert token.startswith("dmgn_") and len(token) == 48
    assert read_token(path) == token == ensure_token(path)
    assert create_token(path) != token


def test_a_token_others_can_read_is_refused_everywhere(tmp_path: Path) -> None:
    path = tmp_path / "api.token"
    token = create_token(path)
    tokens = TokenFile(path)
    assert tokens.allows(f"Bearer {token}".encode())
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_token(path)
    os.utime(path, ns=(1, 1))  # a changed file is read again
    assert not tokens.allows(f"Bearer {token}".encode())


def test_rotation_is_seen_without_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "api.token"
    old = create_token(path)
    tokens = TokenFile(path)
    assert tokens.allows(f"Bearer {old}".encode())
    new = create_token(path)
    assert not tokens.allows(f"Bearer {old}".encode())
    assert tokens.allows(f"bearer {new}".encode())
    for header in (None, b"", new.encode(), f"Basic {new}".encode(), b"Bearer "):
        assert not tokens.allows(header)


def test_missing_or_garbled_token_files_say_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "api.token"
    with pytest.raises(NotInitialized, match="dmgn token rotate"):
        read_token(path)
    assert not TokenFile(path).allows(b"Bearer x")
    path.write_text("hello\n")
    os.chmod(path, 0o600)
    with pytest.raises(ConfigError, match="dmgn token rotate"):
        read_token(path)
