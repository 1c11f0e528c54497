"""Getting the passphrase and opening the vault file: the CLI side of unlocking.

Passphrase sources, in order: ``--passphrase-file`` (first line), the ``DMGN_PASSPHRASE``
environment variable (for scripts and CI; anyone who can read the process environment can read
it, so prefer the file), then an interactive prompt. With no terminal and no other source we
fail with a sentence instead of hanging on a prompt nobody sees.
"""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from dmgn.errors import InvalidInput, NotInitialized
from dmgn.identity import check_passphrase, decrypt_seed, load_or_create_device_id
from dmgn.paths import DataDir

ENV_PASSPHRASE = "DMGN_PASSPHRASE"


def read_passphrase(
    passphrase_file: Path | None,
    *,
    prompt: str = "Passphrase: ",
    confirm: bool = False,
    env: str = ENV_PASSPHRASE,
) -> str:
    if passphrase_file is not None:
        try:
            lines = passphrase_file.read_text().splitlines()
        except OSError as error:
            raise InvalidInput(
                f"cannot read passphrase file {passphrase_file}: {error.strerror}"
            ) from None
        if not lines or not lines[0]:
            raise InvalidInput(f"passphrase file {passphrase_file} is empty")
        return lines[0]
    from_env = os.environ.get(env)
    if from_env:
        return from_env
    if not sys.stdin.isatty():
        raise InvalidInput(
            "a passphrase is needed but there is no terminal to ask on; use --passphrase-file "
            f"FILE or set {env}"
        )
    first = getpass.getpass(prompt)
    if confirm:
        check_passphrase(first)
        if getpass.getpass("Repeat passphrase: ") != first:
            raise InvalidInput("the two passphrases differ; nothing was changed")
    return first


def unlock(data_dir: DataDir, passphrase: str) -> tuple[bytes, bytes]:
    """Open the vault: returns ``(seed, device_id)`` or raises a clear error."""
    if not data_dir.vault.exists():
        raise NotInitialized(
            f"no identity in {data_dir.root}; run `dmgn init` (or `dmgn import -i FILE`) first"
        )
    seed = decrypt_seed(data_dir.vault.read_bytes(), passphrase, source=data_dir.vault)
    return seed, load_or_create_device_id(data_dir.device)
