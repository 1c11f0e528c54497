"""dmgn's wire protocol: Noise XX over WebSocket, bound to dmgn identities.

Sans-IO core (`SecureChannel`, framing, message schemas, the `TokenBucket` every rate limit
uses) plus thin adapters
behind one `Network` interface: `MemoryNetwork` (here, loaded on first use because it needs
trio) and `wire.websocket.WebSocketNetwork` (imported explicitly: the one trio-websocket user).
Everything that goes wrong on the wire is a `WireError`.
"""

import importlib
from typing import TYPE_CHECKING, Any

from wire._errors import (
    ConnectionClosed,
    DecryptError,
    DeviceRefused,
    FrameError,
    HandshakeError,
    IdentityError,
    NonceExhausted,
    SchemaError,
    SuiteRefused,
    WireError,
)
from wire._framing import (
    DEFAULT_MAX_MESSAGE_SIZE,
    MAX_CHUNK_PAYLOAD,
    MAX_FRAME_SIZE,
    LengthPrefixDecoder,
    Reassembler,
    ReassemblyBudget,
    chunk_message,
    length_prefixed,
)
from wire._handshake import (
    CERTIFICATE_CONTEXT,
    DEVICE_ID_BYTES,
    PSK_BYTES,
    DeviceCertificate,
    DeviceCredentials,
    PeerIdentity,
)
from wire._messages import (
    BASE_MESSAGE_TYPES,
    BASE_REGISTRY,
    CLOSE,
    HELLO,
    PING,
    PONG,
    Bool,
    Bytes,
    CloseCode,
    Field,
    Float,
    Int,
    ListOf,
    MapOf,
    Message,
    MessageType,
    SchemaRegistry,
    Str,
    Value,
)
from wire._noise import CipherState, HandshakeState, KeyPair, NoiseProtocol, SymmetricState
from wire._secure_channel import (
    DEVICE_NOISE_PROTOCOL_NAME,
    NOISE_PROTOCOL_NAME,
    PROLOGUE,
    REKEY_INTERVAL,
    ChannelState,
    CloseReceived,
    Event,
    HandshakeComplete,
    MessageReceived,
    Mode,
    SecureChannel,
    Suite,
    default_suites,
    preferred_suite,
    protocol_name,
)
from wire._token_bucket import TokenBucket

if TYPE_CHECKING:
    from wire._connection import HANDSHAKE_TIMEOUT, SecureConnection, secure_connection
    from wire._network import (
        ConnectionHandler,
        MemoryMessageStream,
        MemoryNetwork,
        MessageStream,
        Network,
        StreamMessageStream,
        memory_stream_pair,
    )
    from wire._nursery_errors import sole_error, unwrapped

#: Names whose modules need trio: imported on first use, so that ``import wire`` (the sans-IO
#: core: Noise, framing, schemas) works without trio, as h11 works without a socket library.
_TRIO_ADAPTERS = {
    "HANDSHAKE_TIMEOUT": "wire._connection",
    "SecureConnection": "wire._connection",
    "secure_connection": "wire._connection",
    "ConnectionHandler": "wire._network",
    "MemoryMessageStream": "wire._network",
    "MemoryNetwork": "wire._network",
    "MessageStream": "wire._network",
    "Network": "wire._network",
    "StreamMessageStream": "wire._network",
    "memory_stream_pair": "wire._network",
    "sole_error": "wire._nursery_errors",
    "unwrapped": "wire._nursery_errors",
}


def __getattr__(name: str) -> Any:
    module = _TRIO_ADAPTERS.get(name)
    if module is None:
        raise AttributeError(f"module 'wire' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "BASE_MESSAGE_TYPES",
    "BASE_REGISTRY",
    "CERTIFICATE_CONTEXT",
    "CLOSE",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEVICE_ID_BYTES",
    "DEVICE_NOISE_PROTOCOL_NAME",
    "HANDSHAKE_TIMEOUT",
    "HELLO",
    "MAX_CHUNK_PAYLOAD",
    "MAX_FRAME_SIZE",
    "NOISE_PROTOCOL_NAME",
    "PING",
    "PONG",
    "PROLOGUE",
    "PSK_BYTES",
    "REKEY_INTERVAL",
    "Bool",
    "Bytes",
    "ChannelState",
    "CipherState",
    "CloseCode",
    "CloseReceived",
    "ConnectionClosed",
    "ConnectionHandler",
    "DecryptError",
    "DeviceCertificate",
    "DeviceCredentials",
    "DeviceRefused",
    "Event",
    "Field",
    "Float",
    "FrameError",
    "HandshakeComplete",
    "HandshakeError",
    "HandshakeState",
    "IdentityError",
    "Int",
    "KeyPair",
    "LengthPrefixDecoder",
    "ListOf",
    "MapOf",
    "MemoryMessageStream",
    "MemoryNetwork",
    "Message",
    "MessageReceived",
    "MessageStream",
    "MessageType",
    "Mode",
    "Network",
    "NoiseProtocol",
    "NonceExhausted",
    "PeerIdentity",
    "Reassembler",
    "ReassemblyBudget",
    "SchemaError",
    "SchemaRegistry",
    "SecureChannel",
    "SecureConnection",
    "Str",
    "StreamMessageStream",
    "Suite",
    "SuiteRefused",
    "SymmetricState",
    "TokenBucket",
    "Value",
    "WireError",
    "chunk_message",
    "default_suites",
    "length_prefixed",
    "memory_stream_pair",
    "preferred_suite",
    "protocol_name",
    "secure_connection",
    "sole_error",
    "unwrapped",
]
