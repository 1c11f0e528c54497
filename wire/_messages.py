"""Application messages: msgpack maps with a type tag, checked against declared schemas.

Every message on the wire is a msgpack map ``{"t": "<type>", <field>: <value>, ...}``.
A `MessageType` declares, for one ``t``, which fields exist, which are optional,
and for each its kind and bounds (byte/str length, integer range, list and map
sizes). A `SchemaRegistry` holds the types a connection accepts. Decoding is
strict: not a map, unknown type, unknown field, missing field, wrong kind,
out-of-bounds value, trailing bytes, msgpack extension types — each is a
`SchemaError`, raised before the caller sees any part of the message.

The same schema is enforced when *encoding*, so a bug on our side surfaces as
an error here rather than as a protocol violation reported by the peer.

Why declarative schemas rather than hand-written parsers per message: later
layers (gossip ops, queries, shards) add message types by declaring them, and
the size and shape limits are visible in one place for review.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeAlias

import msgpack

from wire._errors import SchemaError

__all__ = [
    "BASE_MESSAGE_TYPES",
    "BASE_REGISTRY",
    "CLOSE",
    "HELLO",
    "MAX_CLOSE_REASON_BYTES",
    "PING",
    "PONG",
    "Bool",
    "Bytes",
    "CloseCode",
    "Field",
    "Float",
    "Int",
    "ListOf",
    "MapOf",
    "Message",
    "MessageType",
    "SchemaRegistry",
    "Str",
    "Value",
]

Value: TypeAlias = bool | int | float | str | bytes | list["Value"] | dict[str, "Value"]

# Type tags are short ASCII names such as "ping" or "gossip.ops"; 64 bytes leaves
# room for namespacing while keeping the tag small next to the payload.
MAX_TYPE_NAME_BYTES = 64
# A message with more fields than this is not one we declared; the bound keeps
# msgpack from allocating a huge map before validation runs.
MAX_FIELDS_PER_MESSAGE = 64


@dataclass(frozen=True, slots=True)
class Field:
    """Base of the field kinds; `check` raises `SchemaError` on any mismatch."""

    def check(self, value: object, path: str) -> None:
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class Bytes(Field):
    max_len: int
    min_len: int = 0

    def check(self, value: object, path: str) -> None:
        if not isinstance(value, bytes):
            raise SchemaError(f"{path}: expected bytes, got {type(value).__name__}")
        if not self.min_len <= len(value) <= self.max_len:
            raise SchemaError(f"{path}: {len(value)} bytes, allowed {self.min_len}..{self.max_len}")


@dataclass(frozen=True, slots=True)
class Str(Field):
    """A UTF-8 string; the bounds count encoded bytes, which is what costs memory."""

    max_len: int
    min_len: int = 0

    def check(self, value: object, path: str) -> None:
        if not isinstance(value, str):
            raise SchemaError(f"{path}: expected str, got {type(value).__name__}")
        size = len(value.encode("utf-8", "surrogatepass"))
        if not self.min_len <= size <= self.max_len:
            raise SchemaError(f"{path}: {size} UTF-8 bytes, allowed {self.min_len}..{self.max_len}")


@dataclass(frozen=True, slots=True)
class Int(Field):
    min_value: int
    max_value: int

    def check(self, value: object, path: str) -> None:
        # bool is an int subclass in Python but a different msgpack type.
        if not isinstance(value, int) or isinstance(value, bool):
            raise SchemaError(f"{path}: expected int, got {type(value).__name__}")
        if not self.min_value <= value <= self.max_value:
            raise SchemaError(f"{path}: {value} outside {self.min_value}..{self.max_value}")


@dataclass(frozen=True, slots=True)
class Float(Field):
    """A finite float (NaN and infinities are rejected: they break ordering and scores)."""

    min_value: float = -math.inf
    max_value: float = math.inf

    def check(self, value: object, path: str) -> None:
        if not isinstance(value, float):
            raise SchemaError(f"{path}: expected float, got {type(value).__name__}")
        if not math.isfinite(value) or not self.min_value <= value <= self.max_value:
            raise SchemaError(f"{path}: {value} outside {self.min_value}..{self.max_value}")


@dataclass(frozen=True, slots=True)
class Bool(Field):
    def check(self, value: object, path: str) -> None:
        if not isinstance(value, bool):
            raise SchemaError(f"{path}: expected bool, got {type(value).__name__}")


@dataclass(frozen=True, slots=True)
class ListOf(Field):
    item: Field
    max_items: int
    min_items: int = 0

    def check(self, value: object, path: str) -> None:
        if not isinstance(value, list):
            raise SchemaError(f"{path}: expected list, got {type(value).__name__}")
        if not self.min_items <= len(value) <= self.max_items:
            raise SchemaError(
                f"{path}: {len(value)} items, allowed {self.min_items}..{self.max_items}"
            )
        for index, item in enumerate(value):
            self.item.check(item, f"{path}[{index}]")


@dataclass(frozen=True, slots=True)
class MapOf(Field):
    """A map with string keys (e.g. metadata str -> str)."""

    key: Str
    value: Field
    max_items: int

    def check(self, value: object, path: str) -> None:
        if not isinstance(value, dict):
            raise SchemaError(f"{path}: expected map, got {type(value).__name__}")
        if len(value) > self.max_items:
            raise SchemaError(f"{path}: {len(value)} entries, allowed {self.max_items}")
        for key, item in value.items():
            self.key.check(key, f"{path} key")
            self.value.check(item, f"{path}[{key!r}]")


@dataclass(frozen=True, slots=True)
class Message:
    """A validated application message: its type tag and its fields (without ``t``)."""

    type: str
    fields: Mapping[str, Value]

    def __getitem__(self, name: str) -> Value:
        return self.fields[name]

    def get_bytes(self, name: str) -> bytes:
        value = self.fields[name]
        if not isinstance(value, bytes):
            raise SchemaError(f"{self.type}.{name} is not bytes")
        return value

    def get_str(self, name: str) -> str:
        value = self.fields[name]
        if not isinstance(value, str):
            raise SchemaError(f"{self.type}.{name} is not str")
        return value

    def get_int(self, name: str) -> int:
        value = self.fields[name]
        if not isinstance(value, int) or isinstance(value, bool):
            raise SchemaError(f"{self.type}.{name} is not int")
        return value


@dataclass(frozen=True, slots=True)
class MessageType:
    """One message type: ``name`` is its ``t`` tag; ``optional`` fields may be absent."""

    name: str
    fields: Mapping[str, Field]
    optional: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if not self.name or len(self.name.encode()) > MAX_TYPE_NAME_BYTES:
            raise ValueError(f"message type name must be 1..{MAX_TYPE_NAME_BYTES} bytes")
        if "t" in self.fields:
            raise ValueError("field name 't' is reserved for the type tag")
        if len(self.fields) >= MAX_FIELDS_PER_MESSAGE:
            raise ValueError(f"at most {MAX_FIELDS_PER_MESSAGE - 1} fields per message")
        if not self.optional <= self.fields.keys():
            raise ValueError("optional names fields that are not declared")
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))

    def __call__(self, **values: Value) -> Message:
        """Build a message of this type, validated now rather than at send time."""
        message = Message(self.name, MappingProxyType(values))
        self.validate(message.fields)
        return message

    def validate(self, values: Mapping[str, Value]) -> None:
        for name in values:
            if name not in self.fields:
                raise SchemaError(f"{self.name}: unknown field {name!r}")
        for name, kind in self.fields.items():
            if name in values:
                kind.check(values[name], f"{self.name}.{name}")
            elif name not in self.optional:
                raise SchemaError(f"{self.name}: missing field {name!r}")


def _reject_extension(code: int, data: bytes) -> object:
    raise SchemaError(f"msgpack extension type {code} is not allowed")


class SchemaRegistry:
    """The message types one connection accepts, and the codec enforcing them.

    Registries are immutable: `extended` returns a new registry, so a shared
    base (such as `BASE_REGISTRY`) is never changed under another layer's feet.
    """

    __slots__ = ("_types",)

    def __init__(self, types: Iterable[MessageType] = ()) -> None:
        self._types: dict[str, MessageType] = {}
        for message_type in types:
            if message_type.name in self._types:
                raise ValueError(f"message type {message_type.name!r} is registered twice")
            self._types[message_type.name] = message_type

    def __deepcopy__(self, memo: dict[int, object]) -> SchemaRegistry:
        return self  # immutable, so copies of a channel can share it

    def extended(self, *types: MessageType) -> SchemaRegistry:
        return SchemaRegistry([*self._types.values(), *types])

    def __contains__(self, name: object) -> bool:
        return name in self._types

    @property
    def type_names(self) -> frozenset[str]:
        return frozenset(self._types)

    def _type_of(self, name: object) -> MessageType:
        if not isinstance(name, str):
            raise SchemaError("message type tag 't' must be a string")
        message_type = self._types.get(name)
        if message_type is None:
            raise SchemaError(f"unknown message type {name[:MAX_TYPE_NAME_BYTES]!r}")
        return message_type

    def encode(self, message: Message) -> bytes:
        self._type_of(message.type).validate(message.fields)
        return msgpack.packb({"t": message.type, **message.fields}, use_bin_type=True)

    def encode_behind(self, header: int, message: Message) -> memoryview:
        """``header`` (0 or 1) then `encode`'s bytes, in one read-only buffer and one pass.

        This is how the secure channel builds a transport plaintext (chunk header, then the
        message: `wire._framing.chunk_encoded`) without copying a large message once more
        behind its header. msgpack writes the integers 0 and 1 as the single bytes 0x00 and
        0x01, so packing the header as an integer first puts exactly that byte in front."""
        if header not in (0, 1):
            raise ValueError("a chunk header here is 0 or 1")
        self._type_of(message.type).validate(message.fields)
        packer = msgpack.Packer(use_bin_type=True, autoreset=False)
        packer.pack(header)
        packer.pack({"t": message.type, **message.fields})
        return packer.getbuffer()

    def decode(self, data: bytes | memoryview) -> Message:
        try:
            obj = msgpack.unpackb(
                data,
                raw=False,
                use_list=True,
                strict_map_key=True,
                ext_hook=_reject_extension,
                max_map_len=MAX_FIELDS_PER_MESSAGE,
            )
        except SchemaError:
            raise
        except Exception as exc:  # msgpack reports malformed input with many types
            raise SchemaError(f"malformed msgpack: {type(exc).__name__}") from exc
        if not isinstance(obj, dict):
            raise SchemaError("a message must be a msgpack map")
        message_type = self._type_of(obj.pop("t", None))
        message_type.validate(obj)
        return Message(message_type.name, MappingProxyType(obj))


class CloseCode:
    """Why a connection ends; the values follow WebSocket close codes (RFC 6455 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    POLICY_VIOLATION = 1008  # used for identity / pinning failures
    MESSAGE_TOO_BIG = 1009
    TIMEOUT = 4000  # application range (RFC 6455 7.4.2): handshake or idle timeout
    #: The responder refuses a device handshake (the initiator lacks the PSK, or the responder
    #: takes none): the initiator may retry in storage mode. Says nothing about identities.
    DEVICE_REFUSED = 4001
    #: The responder does not take the initiator's cipher suite (AES-GCM without fast AES
    #: here): the initiator dials again with ChaChaPoly.
    SUITE_REFUSED = 4002


# A close reason is shown to a person and logged; WebSocket itself allows 123 bytes
# in a close frame, we allow a little more inside the encrypted channel.
MAX_CLOSE_REASON_BYTES = 256
# Ping nonces only need to match a pong to its ping.
_PING_NONCE_BYTES = 8

PING = MessageType("ping", {"nonce": Bytes(_PING_NONCE_BYTES, _PING_NONCE_BYTES)})
PONG = MessageType("pong", {"nonce": Bytes(_PING_NONCE_BYTES, _PING_NONCE_BYTES)})
HELLO = MessageType(
    "hello",
    {
        # Free-form software name/version, for `dmgn peers` and debugging.
        "agent": Str(64),
        # Feature flags the sender understands; 32 x 32 bytes is ample and tiny.
        "features": ListOf(Str(32), max_items=32),
    },
    optional=frozenset({"features"}),
)
CLOSE = MessageType(
    "close",
    {"code": Int(0, 4999), "reason": Str(MAX_CLOSE_REASON_BYTES)},
)
BASE_MESSAGE_TYPES = (PING, PONG, HELLO, CLOSE)
BASE_REGISTRY = SchemaRegistry(BASE_MESSAGE_TYPES)
