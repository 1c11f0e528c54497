"""User-facing errors of the domain layer.

Every error a person may see says what happened, why, and what to do. The CLI prints
``str(error)`` as one line and exits with ``error.exit_code``; programs read ``error.code``.
"""

from __future__ import annotations


class DmgnError(Exception):
    """Base of every error dmgn reports to a user."""

    code = "error"
    exit_code = 1


class WrongPassphrase(DmgnError):
    code = "wrong_passphrase"
    exit_code = 3


class VaultCorrupt(DmgnError):
    code = "vault_corrupt"
    exit_code = 4


class NotInitialized(DmgnError):
    code = "not_initialized"
    exit_code = 5


class AlreadyInitialized(DmgnError):
    code = "already_initialized"
    exit_code = 6


class ConfigError(DmgnError):
    code = "bad_config"
    exit_code = 7


class TamperedEnvelope(DmgnError):
    code = "tampered"
    exit_code = 8


class NotFound(DmgnError):
    code = "not_found"
    exit_code = 9


class Ambiguous(DmgnError):
    code = "ambiguous_id"
    exit_code = 10


class InvalidInput(DmgnError):
    code = "invalid_input"
    exit_code = 2


class DaemonOwnsDataDir(DmgnError):
    code = "daemon_running"
    exit_code = 11


class DaemonUnavailable(DmgnError):
    code = "daemon_unavailable"
    exit_code = 12


class DiskFull(DmgnError):
    """The disk (or the user's quota) is full: nothing was written; freeing space fixes it."""

    code = "disk_full"
    exit_code = 13


class BackupRefused(DmgnError):
    """A backup archive that is damaged, truncated or another identity's; nothing was changed."""

    code = "backup_refused"
    exit_code = 14


def error_for_code(code: str, message: str) -> DmgnError:
    """Rebuild a typed error from its wire form (control socket, actor ``Err`` values)."""
    for cls in _ALL:
        if cls.code == code:
            return cls(message)
    error = DmgnError(message)
    error.code = code
    return error


def error_for_exit_code(exit_code: int, message: str) -> DmgnError | None:
    """The typed error a dmgn process exits with ``exit_code`` for, if it is one of ours."""
    for cls in _ALL:
        if cls.exit_code == exit_code:
            return cls(message)
    return None


_ALL: tuple[type[DmgnError], ...] = (
    WrongPassphrase,
    VaultCorrupt,
    NotInitialized,
    AlreadyInitialized,
    ConfigError,
    TamperedEnvelope,
    NotFound,
    Ambiguous,
    InvalidInput,
    DaemonOwnsDataDir,
    DaemonUnavailable,
    DiskFull,
    BackupRefused,
)
