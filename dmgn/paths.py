"""Where a node keeps its files.

The data dir defaults to the platform's config dir (``~/.config/dmgn`` on Linux, like the
reference) and is overridden by ``--data-dir`` or ``DMGN_DATA_DIR``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_DATA_DIR = "DMGN_DATA_DIR"


def default_data_dir() -> Path:
    env = os.environ.get(ENV_DATA_DIR)
    if env:
        return Path(env).expanduser()
    import platformdirs  # here: `dmgn status --data-dir D` through the daemon never needs it

    return Path(platformdirs.user_config_dir("dmgn", appauthor=False, roaming=True))


@dataclass(frozen=True, slots=True)
class DataDir:
    """The named files inside one node's data directory."""

    root: Path

    @property
    def vault(self) -> Path:
        return self.root / "identity.vault"

    @property
    def device(self) -> Path:
        return self.root / "device.json"

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def store(self) -> Path:
        return self.root / "memories.duckdb"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def control_socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def mcp_socket(self) -> Path:
        return self.root / "mcp.sock"

    @property
    def api_token(self) -> Path:
        return self.root / "api.token"

    @property
    def pid_file(self) -> Path:
        return self.root / "dmgn-node.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "logs" / "dmgn-node.log"

    @property
    def lock_file(self) -> Path:
        return self.root / "node.lock"

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)


def write_private(path: Path, data: bytes) -> None:
    """Write a file atomically with mode 0600: temp file, fsync, rename, fsync the directory.

    Atomic because a vault half-written by a crash would lose the identity; 0600 from the first
    byte because secrets must never be readable by others, not even briefly.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
