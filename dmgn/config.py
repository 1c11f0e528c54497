"""config.json: the node's settings, with defaults, validation and clear errors.

Fields follow the reference (listen address, bootstrap peers, the node's own addresses written at
start, gossip/sync/query settings), adapted to our transport: addresses are ``ws://host:port``
URLs instead of libp2p multiaddrs. Unknown keys are rejected rather than ignored, because a typo
(``bootstrap_peer``) silently ignored is a node that never finds its peers.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dmgn.errors import ConfigError
from dmgn.paths import write_private

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``"60s"``, ``"2m"``, ``"500ms"`` → seconds (Go-style, as the reference writes them)."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"{text!r} is not a duration like '500ms', '2s', '1m'")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def check_ws_address(text: str) -> str:
    """Validate a ``ws://host:port`` (or ``wss://``) address and return it unchanged."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a ws:// address")
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("ws", "wss") or not parts.hostname or port is None:
        raise ValueError(f"{text!r} is not an address like 'ws://192.168.1.10:4001'")
    return text


@dataclass(frozen=True, slots=True)
class Config:
    listen_addr: str = "ws://0.0.0.0:4001"
    #: Reserved for a REST API, which dmgn does not serve (the control socket and MCP replace
    #: it). Kept so reference configs load; any non-zero value is reported at start.
    api_port: int = 0
    bootstrap_peers: list[str] = field(default_factory=list)
    #: This node's own reachable addresses, written by dmgn-node at start. Share one of these
    #: with another node as its bootstrap peer.
    node_addrs: list[str] = field(default_factory=list)
    gossip_topic: str = "dmgn/memories/1.0.0"
    sync_interval: str = "60s"
    query_timeout: str = "2s"
    #: Weight of meaning (1) against words (0) in search. ``None`` (the default) lets the node
    #: choose by embedder: 0.7 with the semantic model, 0.3 with the lexical fallback - the best
    #: of each on our conversational-memory evaluation (docs/search.md).
    search_alpha: float | None = None
    max_connections: int = 64
    mdns: bool = True
    dht_port: int = 0
    log_level: str = "info"

    @property
    def sync_interval_seconds(self) -> float:
        return parse_duration(self.sync_interval)

    @property
    def query_timeout_seconds(self) -> float:
        return parse_duration(self.query_timeout)

    def validate(self, source: str = "config.json") -> Config:
        problems: list[str] = []

        def check(name: str, ok: bool, want: str) -> None:
            if not ok:
                problems.append(f"{name} = {getattr(self, name)!r}: {want}")

        for name in ("listen_addr",):
            try:
                check_ws_address(getattr(self, name))
            except ValueError as error:
                problems.append(f"{name}: {error}")
        for name in ("bootstrap_peers", "node_addrs"):
            value = getattr(self, name)
            if not isinstance(value, list):
                problems.append(f"{name} must be a list of ws:// addresses")
                continue
            for entry in value:
                try:
                    check_ws_address(entry)
                except ValueError as error:
                    problems.append(f"{name}: {error}")
        for name in ("sync_interval", "query_timeout"):
            try:
                seconds = parse_duration(getattr(self, name))
                check(name, seconds > 0, "must be longer than zero")
            except ValueError as error:
                problems.append(f"{name}: {error}")
        check(
            "api_port",
            _is_int(self.api_port) and 0 <= self.api_port <= 65535,
            "must be a port number 0-65535",
        )
        check(
            "dht_port",
            _is_int(self.dht_port) and 0 <= self.dht_port <= 65535,
            "must be a port number 0-65535",
        )
        check(
            "search_alpha",
            self.search_alpha is None
            or (
                isinstance(self.search_alpha, int | float)
                and not isinstance(self.search_alpha, bool)
                and 0.0 <= self.search_alpha <= 1.0
            ),
            "must be null (automatic) or a number between 0 (words only) and 1 (meaning only)",
        )
        check(
            "max_connections",
            _is_int(self.max_connections) and 1 <= self.max_connections <= 10_000,
            "must be a whole number 1-10000",
        )
        check("mdns", isinstance(self.mdns, bool), "must be true or false")
        check(
            "gossip_topic",
            isinstance(self.gossip_topic, str) and bool(self.gossip_topic),
            "must be a non-empty string",
        )
        check(
            "log_level",
            self.log_level in ("debug", "info", "warning", "error"),
            "must be one of debug, info, warning, error",
        )
        if problems:
            raise ConfigError(f"invalid {source}: " + "; ".join(problems))
        return self

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


FIELD_NAMES = frozenset(f.name for f in fields(Config))


def config_from_json(document: object, source: str = "config.json") -> Config:
    if not isinstance(document, dict):
        raise ConfigError(f"invalid {source}: expected a JSON object")
    unknown = sorted(set(document) - FIELD_NAMES - {"data_dir"})
    if unknown:
        raise ConfigError(
            f"invalid {source}: unknown field(s) {', '.join(unknown)}; known fields are "
            f"{', '.join(sorted(FIELD_NAMES))}"
        )
    known = {k: v for k, v in document.items() if k in FIELD_NAMES}
    return replace(Config(), **known).validate(source)


def load_config(path: Path) -> Config:
    """Read config.json; a missing file means defaults."""
    if not path.exists():
        return Config()
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"cannot read {path}: {error}; fix the JSON or delete the file to get defaults"
        ) from None
    return config_from_json(document, str(path))


def save_config(path: Path, config: Config, data_dir: Path) -> None:
    document = {"data_dir": str(data_dir), **config.validate(str(path)).to_json()}
    write_private(path, (json.dumps(document, indent=2) + "\n").encode())
