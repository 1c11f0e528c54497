"""config.json: the node's settings, with defaults, validation and clear errors.

Fields follow the reference (listen address, bootstrap peers, the node's own addresses written at
start, gossip/sync/query settings), adapted to our transport: addresses are ``ws://host:port``
URLs instead of libp2p multiaddrs. Unknown keys are rejected rather than ignored, because a typo
(``bootstrap_peer``) silently ignored is a node that never finds its peers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, ValidationError

from dmgn.errors import ConfigError
from dmgn.paths import write_private

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_REPLICA = re.compile(r"^recent:(\d{1,6})$")
#: Longest ``recent:<days>`` window accepted (a century; beyond that, say ``full``).
MAX_REPLICA_DAYS = 36_500


def parse_replica(text: object) -> int | None:
    """``"full"`` → None (keep everything); ``"recent:<days>"`` → the window in days."""
    if text == "full":
        return None
    match = _REPLICA.match(text) if isinstance(text, str) else None
    if not match or not 1 <= int(match.group(1)) <= MAX_REPLICA_DAYS:
        raise ValueError(
            f"{text!r} is not a replica policy: use 'full' or 'recent:<days>' "
            f"with 1-{MAX_REPLICA_DAYS} days, e.g. 'recent:30'"
        )
    return int(match.group(1))


def _replica(text: str) -> str:
    parse_replica(text)
    return text


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


def _positive_duration(text: str) -> str:
    if parse_duration(text) <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return text


_AGE = re.compile(r"^\s*(\d+)\s*(s|m|h|d|w|y)\s*$")
_AGE_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
#: A retention period that never expires.
FOREVER = "forever"


def parse_age(text: str) -> float | None:
    """A retention period: ``"365d"``, ``"12w"``, ``"2y"``, ``"36h"`` → seconds; ``"forever"``
    → ``None`` (never expires)."""
    if text.strip().lower() == FOREVER:
        return None
    match = _AGE.match(text)
    if not match or int(match.group(1)) <= 0:
        raise ValueError(
            f"{text!r} is not a retention period like '365d', '12w', '2y' or 'forever'"
        )
    return float(int(match.group(1)) * _AGE_SECONDS[match.group(2)])


def _check_age(text: str) -> str:
    parse_age(text)
    return text


def check_metrics_address(text: str) -> str:
    """``host:port``, ``:port`` or ``port`` (host 127.0.0.1: metrics stay on this machine unless
    a host is named). Port 0 picks a free one (`dmgn start` prints the URL)."""
    host, port = split_metrics_address(text)
    if not 0 <= port <= 65535 or not host:
        raise ValueError(f"{text!r} is not an address like '127.0.0.1:9464'")
    return text


def split_metrics_address(text: str) -> tuple[str, int]:
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host, port = "", text.strip()
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{text!r} is not an address like '127.0.0.1:9464'") from None
    return host.strip("[]") or "127.0.0.1", number


WsAddress = Annotated[str, Strict(), AfterValidator(check_ws_address)]
RetentionPeriod = Annotated[str, Strict(), AfterValidator(_check_age)]
MetricsAddress = Annotated[str, Strict(), AfterValidator(check_metrics_address)]
Duration = Annotated[str, Strict(), AfterValidator(_positive_duration)]
Port = Annotated[int, Strict(), Field(ge=0, le=65535)]


#: Where a node listens when config.json does not say: every interface, the reference's port.
DEFAULT_LISTEN_ADDR = "ws://0.0.0.0:4001"


class Config(BaseModel):
    """config.json, declared once: field types and ranges are the schema it is checked against."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: ``None`` (the default): listen on :data:`DEFAULT_LISTEN_ADDR`, or on a free port of the
    #: same host when that port is taken (another program, another user's node), which the node
    #: says and records in ``node_addrs``. An address set here is strict: taken means an error.
    listen_addr: WsAddress | None = None
    #: Port of the REST API (docs/rest.md) on ``api_host``; 0 (the default) serves none. The
    #: reference's usual value is 8080.
    api_port: Port = 0
    #: Where the REST API listens: loopback by default, so only programs on this machine reach
    #: it (and they still need the Bearer token). Plain HTTP: put TLS in front for more.
    api_host: Annotated[str, Strict(), Field(min_length=1, max_length=255)] = "127.0.0.1"
    bootstrap_peers: list[WsAddress] = Field(default_factory=list)
    #: This node's own reachable addresses, written by dmgn-node at start. Share one of these
    #: with another node as its bootstrap peer.
    node_addrs: list[WsAddress] = Field(default_factory=list)
    gossip_topic: Annotated[str, Strict(), Field(min_length=1)] = "dmgn/memories/1.0.0"
    sync_interval: Duration = "60s"
    query_timeout: Duration = "2s"
    #: What this device keeps locally: ``"full"`` (every memory) or ``"recent:<days>"`` (only
    #: memories of the last days; older ones are found through the query router on a full
    #: device - see docs/queries.md).
    replica: Annotated[str, Strict(), AfterValidator(_replica)] = "full"
    #: Weight of meaning (1) against words (0) in search. ``None`` (the default) lets the node
    #: choose by embedder: 0.7 with the semantic model, 0.3 with the lexical fallback - the best
    #: of each on our conversational-memory evaluation (docs/search.md).
    search_alpha: Annotated[float, Strict(), Field(ge=0.0, le=1.0)] | None = None
    max_connections: Annotated[int, Strict(), Field(ge=1, le=10_000)] = 64
    mdns: Annotated[bool, Strict()] = True
    dht_port: Port = 0
    #: Bytes this node holds for other identities (encrypted shards and mailboxes it cannot
    #: read; each identity gets at most a quarter). 0 turns the storage service off.
    storage_quota: Annotated[int, Strict(), Field(ge=0)] = 1 << 30
    #: Find storage peers through peer exchange (docs/storage.md); off: only bootstrap and
    #: added peers hold our shards, and this node is passed on to nobody.
    peer_exchange: Annotated[bool, Strict()] = True
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: The log file's lines: ``json`` (one object per line: time, level, logger, message and
    #: any structured fields) or ``text``. The foreground stderr copy is always text.
    log_format: Literal["json", "text"] = "json"
    #: Prometheus metrics endpoint (``GET /metrics``), e.g. ``"127.0.0.1:9464"``; ``":9464"``
    #: means loopback. Off when unset. See docs/metrics.md.
    metrics_addr: MetricsAddress | None = None
    #: How long memories of each type are kept, e.g. ``{"conversation": "365d", "document":
    #: "forever"}``; types not named are kept forever. Expired memories are deleted like any
    #: delete (tombstones that sync). See docs/retention.md.
    retention: dict[Literal["text", "conversation", "observation", "document"], RetentionPeriod] = (
        Field(default_factory=dict)
    )

    @property
    def sync_interval_seconds(self) -> float:
        return parse_duration(self.sync_interval)

    @property
    def query_timeout_seconds(self) -> float:
        return parse_duration(self.query_timeout)

    @property
    def replica_days(self) -> int | None:
        return parse_replica(self.replica)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump()


FIELD_NAMES = frozenset(Config.model_fields)

#: What to write instead, per field, when a value has the wrong type or is out of range.
_WANT = {
    "listen_addr": "must be null (automatic) or an address like 'ws://0.0.0.0:4001'",
    "api_port": "must be a port number 0-65535 (0: no REST API)",
    "api_host": "must be an address to listen on, like 127.0.0.1",
    "replica": "must be 'full' or 'recent:<days>'",
    "dht_port": "must be a port number 0-65535",
    "bootstrap_peers": "must be a list of ws:// addresses",
    "node_addrs": "must be a list of ws:// addresses",
    "gossip_topic": "must be a non-empty string",
    "sync_interval": "must be a duration like '500ms', '2s', '1m'",
    "query_timeout": "must be a duration like '500ms', '2s', '1m'",
    "search_alpha": "must be null (automatic) or a number between 0 (words only) and 1 "
    "(meaning only)",
    "max_connections": "must be a whole number 1-10000",
    "mdns": "must be true or false",
    "log_level": "must be one of debug, info, warning, error",
    "log_format": "must be json or text",
    "metrics_addr": "must be null (off) or an address like '127.0.0.1:9464'",
    "retention": "must map memory types (text, conversation, observation, document) to "
    "periods like '365d' or 'forever'",
}


def _problems(document: dict[str, Any], error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        name = str(item["loc"][0]) if item["loc"] else "config"
        if item["type"] == "value_error":  # our validators' own sentence names the value
            problems.append(f"{name}: {str(item['msg']).removeprefix('Value error, ')}")
        else:
            problems.append(f"{name} = {document.get(name)!r}: {_WANT.get(name, item['msg'])}")
    return list(dict.fromkeys(problems))


def config_from_json(document: object, source: str = "config.json") -> Config:
    if not isinstance(document, dict):
        raise ConfigError(f"invalid {source}: expected a JSON object")
    unknown = sorted(set(map(str, document)) - FIELD_NAMES - {"data_dir"})
    if unknown:
        raise ConfigError(
            f"invalid {source}: unknown field(s) {', '.join(unknown)}; known fields are "
            f"{', '.join(sorted(FIELD_NAMES))}"
        )
    known = {k: v for k, v in document.items() if k in FIELD_NAMES}
    try:
        return Config(**known)
    except ValidationError as error:
        raise ConfigError(f"invalid {source}: " + "; ".join(_problems(known, error))) from None


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
    document = {"data_dir": str(data_dir), **config.to_json()}
    write_private(path, (json.dumps(document, indent=2) + "\n").encode())
