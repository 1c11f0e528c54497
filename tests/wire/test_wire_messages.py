"""Message schemas: strict decoding, declared limits, and a registry later layers extend."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest

from wire import (
    BASE_REGISTRY,
    CLOSE,
    HELLO,
    PING,
    Bool,
    Bytes,
    Float,
    Int,
    ListOf,
    MapOf,
    MessageType,
    SchemaError,
    Str,
)

NOTE = MessageType(
    "test.note",
    {
        "id": Bytes(32, 32),
        "text": Str(10),
        "count": Int(0, 100),
        "score": Float(0.0, 1.0),
        "pinned": Bool(),
        "tags": ListOf(Str(8), max_items=3),
        "meta": MapOf(Str(8), Str(8), max_items=2),
    },
    optional=frozenset({"meta"}),
)
REGISTRY = BASE_REGISTRY.extended(NOTE)
VALID: dict[str, Any] = {
    "t": "test.note",
    "id": bytes(32),
    "text": "hi",
    "count": 3,
    "score": 0.5,
    "pinned": False,
    "tags": ["a", "b"],
    "meta": {"k": "v"},
}


def _packed(**changes: Any) -> bytes:
    obj = {**VALID, **changes}
    return msgpack.packb({k: v for k, v in obj.items() if v is not ...}, use_bin_type=True)


def test_valid_message_round_trips() -> None:
    message = REGISTRY.decode(_packed())
    assert message.type == "test.note"
    assert message["tags"] == ["a", "b"]
    assert REGISTRY.decode(REGISTRY.encode(message)) == message


def test_optional_field_may_be_absent() -> None:
    assert "meta" not in REGISTRY.decode(_packed(meta=...)).fields


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        ({"t": "nope"}, "unknown message type"),
        ({"t": 7}, "must be a string"),
        ({"t": ...}, "must be a string"),
        ({"text": ...}, "missing field 'text'"),
        ({"extra": 1}, "unknown field 'extra'"),
        ({"id": bytes(31)}, "31 bytes"),
        ({"id": "not bytes" * 4}, "expected bytes"),
        ({"text": "x" * 11}, "11 UTF-8 bytes"),
        ({"text": "é" * 6}, "12 UTF-8 bytes"),
        ({"text": b"bytes"}, "expected str"),
        ({"count": 101}, "outside"),
        ({"count": -1}, "outside"),
        ({"count": True}, "expected int"),
        ({"count": 1.0}, "expected int"),
        ({"score": 1}, "expected float"),
        ({"score": 2.0}, "outside"),
        ({"score": math.nan}, "outside"),
        ({"pinned": 1}, "expected bool"),
        ({"tags": ["a", "b", "c", "d"]}, "4 items"),
        ({"tags": "abc"}, "expected list"),
        ({"tags": [1]}, r"tags\[0\]: expected str"),
        ({"meta": {"a": "1", "b": "2", "c": "3"}}, "3 entries"),
        ({"meta": {"k": 1}}, "expected str"),
        ({"meta": {b"k": "v"}}, "expected str"),
    ],
)
def test_invalid_fields_are_refused(changes: dict[str, Any], error: str) -> None:
    with pytest.raises(SchemaError, match=error):
        REGISTRY.decode(_packed(**changes))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        msgpack.packb([1, 2]),
        msgpack.packb("ping"),
        msgpack.packb({"t": "ping", "nonce": bytes(8)}, use_bin_type=True) + b"\x00",
        msgpack.packb({1: 2}),
        msgpack.packb({"t": "ping", "nonce": msgpack.ExtType(5, b"x")}),
        msgpack.packb({"t": "ping", "nonce": msgpack.Timestamp(0)}),
        msgpack.packb({f"f{i}": 0 for i in range(100)}),
        b"\x91" * 5000,  # deeply nested lists
    ],
)
def test_malformed_msgpack_is_a_schema_error(data: bytes) -> None:
    with pytest.raises(SchemaError):
        REGISTRY.decode(data)


def test_encoding_enforces_the_schema_too() -> None:
    with pytest.raises(SchemaError):
        PING(nonce=bytes(9))
    with pytest.raises(SchemaError, match="unknown message type"):
        BASE_REGISTRY.encode(NOTE(**{k: v for k, v in VALID.items() if k != "t"}))


def test_base_messages() -> None:
    assert BASE_REGISTRY.type_names == {"ping", "pong", "hello", "close"}
    hello = BASE_REGISTRY.decode(BASE_REGISTRY.encode(HELLO(agent="dmgn/0.1")))
    assert hello.get_str("agent") == "dmgn/0.1"
    close = BASE_REGISTRY.decode(BASE_REGISTRY.encode(CLOSE(code=1000, reason="bye")))
    assert close.get_int("code") == 1000


def test_registries_are_extended_not_mutated() -> None:
    assert "test.note" not in BASE_REGISTRY
    assert "test.note" in REGISTRY
    with pytest.raises(ValueError, match="twice"):
        REGISTRY.extended(NOTE)


def test_message_types_reserve_the_tag_and_check_optional_names() -> None:
    with pytest.raises(ValueError, match="reserved"):
        MessageType("bad", {"t": Str(1)})
    with pytest.raises(ValueError, match="optional"):
        MessageType("bad", {"a": Str(1)}, optional=frozenset({"b"}))
    with pytest.raises(ValueError, match="name"):
        MessageType("", {})
