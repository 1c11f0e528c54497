"""The REST API's Bearer token: made at ``dmgn init``, kept in the data dir with mode 0600.

Who holds it can do anything the CLI can (add, read, delete memories) through the REST API, so it
is a secret like the vault: written atomically, 0600 from the first byte, never logged. It is
independent of the identity (losing it costs nothing: ``dmgn token rotate`` makes a new one and
the old one stops working at once, because the daemon reads the file again when it changes).

Format: ``dmgn_`` + 43 URL-safe base64 characters (32 random bytes), so it is recognisable in a
leaked log and fits an HTTP header without quoting.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
from pathlib import Path

from dmgn.errors import ConfigError, NotInitialized
from dmgn.paths import write_private

__all__ = [
    "TOKEN_BYTES",
    "TOKEN_PREFIX",
    "create_token",
    "ensure_token",
    "file_version",
    "new_token",
    "read_token",
]

#: 256 bits: guessing is hopeless even at millions of attempts a second for centuries.
TOKEN_BYTES = 32
TOKEN_PREFIX = "dmgn_"
_FORMAT = re.compile(r"^dmgn_[A-Za-z0-9_-]{43}$")


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)


def create_token(path: Path) -> str:
    """Write a fresh token (replacing any old one, which stops working) and return it."""
    token = new_token()
    write_private(path, (token + "\n").encode())
    return token


def read_token(path: Path) -> str:
    """The token in ``path``; refuse a file others can read, or one that is not a token."""
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except FileNotFoundError:
        raise NotInitialized(
            f"no REST API token at {path}; run `dmgn token rotate` to make one"
        ) from None
    except OSError as error:
        raise ConfigError(f"cannot read the REST API token {path}: {error.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"the REST API token {path} is readable by other users (mode "
            f"{stat.S_IMODE(mode):o}); run `chmod 600 {path}`, or `dmgn token rotate` "
            "if someone may have read it"
        )
    if not _FORMAT.match(text):
        raise ConfigError(f"{path} does not hold a dmgn token; run `dmgn token rotate`")
    return text


def ensure_token(path: Path) -> str:
    """The token, made now if a data dir from before the REST API has none."""
    if not path.exists():
        return create_token(path)
    return read_token(path)


def file_version(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is replaced (``write_private`` renames a new file in)."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)
