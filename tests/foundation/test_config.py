"""config.json: defaults, validation, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmgn.config import Config, config_from_json, load_config, parse_duration, save_config
from dmgn.errors import ConfigError


def test_missing_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "config.json") == Config()


def test_saved_config_round_trips_with_reference_fields(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    save_config(path, Config(bootstrap_peers=["ws://10.0.0.2:4001"]), tmp_path)
    document = json.loads(path.read_text())
    for field in (
        "data_dir",
        "listen_addr",
        "api_port",
        "bootstrap_peers",
        "node_addrs",
        "gossip_topic",
        "sync_interval",
        "query_timeout",
    ):
        assert field in document
    assert load_config(path).bootstrap_peers == ["ws://10.0.0.2:4001"]
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("listen_addr", "/ip4/0.0.0.0/tcp/4001", "not an address like"),
        ("bootstrap_peers", ["http://x:1"], "not an address like"),
        ("bootstrap_peers", "ws://x:1", "must be a list"),
        ("sync_interval", "soon", "not a duration"),
        ("query_timeout", "0s", "longer than zero"),
        ("search_alpha", 1.5, "between 0"),
        ("max_connections", 0, "1-10000"),
        ("api_port", 70000, "0-65535"),
        ("mdns", "yes", "true or false"),
    ],
)
def test_bad_values_are_named_with_what_to_write(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        config_from_json({field: value})
    assert field in str(info.value)


def test_unknown_field_is_rejected_with_the_known_ones_listed() -> None:
    with pytest.raises(ConfigError, match=r"unknown field.*bootstrap_peer;.*bootstrap_peers"):
        config_from_json({"bootstrap_peer": []})


def test_unparseable_json_says_how_to_recover(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{nope")
    with pytest.raises(ConfigError, match="fix the JSON or delete the file"):
        load_config(path)


def test_durations() -> None:
    assert parse_duration("60s") == 60
    assert parse_duration("500ms") == 0.5
    assert parse_duration("2m") == 120
