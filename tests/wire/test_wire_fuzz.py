"""Property-based fuzzing: whatever a peer sends, only `WireError` comes out.

Example count per property comes from ``DMGN_FUZZ_EXAMPLES`` (default 300 for
CI). The benchmark-style run uses 10 000+::

    DMGN_FUZZ_EXAMPLES=10000 .venv/bin/pytest tests/wire/test_wire_fuzz.py \
        --hypothesis-show-statistics
"""

from __future__ import annotations

import contextlib
import copy
import os
from functools import cache

import hypothesis
import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wire import (
    BASE_REGISTRY,
    HELLO,
    PING,
    Bytes,
    ChannelState,
    FrameError,
    HandshakeComplete,
    LengthPrefixDecoder,
    ListOf,
    MapOf,
    MessageReceived,
    MessageType,
    Reassembler,
    SchemaError,
    SecureChannel,
    Str,
    WireError,
    length_prefixed,
)
from wire.testing import new_device, open_channel_pair

FUZZ = settings(
    max_examples=int(os.environ.get("DMGN_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DOC = MessageType(
    "fuzz.doc",
    {
        "body": Bytes(100_000),
        "tags": ListOf(Str(16), max_items=4),
        "meta": MapOf(Str(8), Str(8), max_items=4),
    },
    optional=frozenset({"tags", "meta"}),
)
REGISTRY = BASE_REGISTRY.extended(DOC)


@cache
def _handshake_transcript() -> tuple[SecureChannel, SecureChannel, bytes, bytes, bytes]:
    """Both channels right before message 1 is read, plus the three messages."""
    a = SecureChannel(new_device(), initiator=True, registry=REGISTRY)
    b = SecureChannel(new_device(), initiator=False, registry=REGISTRY)
    fresh = copy.deepcopy((a, b))
    message1 = a.initiate()
    b.receive_frame(message1)
    (message2,) = b.frames_to_send()
    a.receive_frame(message2)
    (message3,) = a.frames_to_send()
    b.receive_frame(message3)
    return fresh[0], fresh[1], message1, message2, message3


@cache
def _open_pair() -> tuple[SecureChannel, SecureChannel]:
    return open_channel_pair(new_device(), new_device(), registry=REGISTRY)


def _fresh_open_pair() -> tuple[SecureChannel, SecureChannel]:
    return copy.deepcopy(_open_pair())


def _mutations(original: bytes) -> st.SearchStrategy[bytes]:
    """Bit flips, truncations, extensions and splices of a valid message."""
    n = len(original)
    flip = st.tuples(st.integers(0, n - 1), st.integers(1, 255)).map(
        lambda p: original[: p[0]] + bytes([original[p[0]] ^ p[1]]) + original[p[0] + 1 :]
    )
    truncate = st.integers(0, n - 1).map(lambda k: original[:k])
    extend = st.binary(min_size=1, max_size=64).map(lambda extra: original + extra)
    splice = st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=16)).map(
        lambda p: original[: p[0]] + p[1] + original[p[0] :]
    )
    return st.one_of(flip, truncate, extend, splice).filter(lambda m: m != original)


def _drive_handshake(messages: list[bytes]) -> None:
    """Feed messages alternately to a fresh responder/initiator; WireError is the only exit."""
    a, b, *_ = _handshake_transcript()
    a, b = copy.deepcopy((a, b))
    a.initiate()
    receivers = [b, a, b]
    for receiver, message in zip(receivers, messages, strict=False):
        try:
            receiver.receive_frame(message)
        except WireError:
            assert receiver.state is ChannelState.ERROR
            return


@FUZZ
@given(st.lists(st.binary(max_size=400), min_size=1, max_size=3))
def test_random_handshake_messages_only_raise_wire_error(messages: list[bytes]) -> None:
    _drive_handshake(messages)


@FUZZ
@given(st.data())
def test_tampered_handshake_messages_never_complete(data: st.DataObject) -> None:
    """Run a live handshake and tamper with message 1, 2 or 3 on the way."""
    a, b, *_ = _handshake_transcript()
    a, b = copy.deepcopy((a, b))
    index = data.draw(st.sampled_from([0, 1, 2]))

    def deliver(position: int, message: bytes) -> bytes:
        return data.draw(_mutations(message)) if position == index else message

    completed = 0
    try:
        b.receive_frame(deliver(0, a.initiate()))
        (message2,) = b.frames_to_send()
        events = a.receive_frame(deliver(1, message2))
        completed += any(isinstance(event, HandshakeComplete) for event in events)
        (message3,) = a.frames_to_send()
        events = b.receive_frame(deliver(2, message3))
        completed += any(isinstance(event, HandshakeComplete) for event in events)
    except WireError:
        pass
    assert completed < 2, "a tampered handshake must not complete on both sides"


@FUZZ
@given(st.binary(max_size=2000))
def test_random_transport_frames_are_rejected(frame: bytes) -> None:
    _, b = _fresh_open_pair()
    try:
        b.receive_frame(frame)
    except WireError:
        assert b.state is ChannelState.ERROR
    else:
        raise AssertionError("an unauthenticated frame was accepted")


@FUZZ
@given(st.data())
def test_tampered_transport_frames_are_rejected(data: st.DataObject) -> None:
    a, b = _fresh_open_pair()
    (frame,) = a.send(PING(nonce=data.draw(st.binary(min_size=8, max_size=8))))
    tampered = data.draw(_mutations(frame))
    try:
        b.receive_frame(tampered)
    except WireError:
        return
    raise AssertionError("a tampered frame was accepted")


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.text(max_size=8) | st.sampled_from(["t", "body", "tags"]), inner, max_size=5
        )
    ),
    max_leaves=10,
)
message_like = st.fixed_dictionaries(
    {"t": st.sampled_from(["ping", "pong", "hello", "close", "fuzz.doc", "other"])},
    optional={
        "nonce": msgpack_values,
        "body": msgpack_values,
        "tags": msgpack_values,
        "meta": msgpack_values,
        "agent": msgpack_values,
        "code": msgpack_values,
        "reason": msgpack_values,
    },
)


# Plaintexts an authenticated peer might send: raw garbage, or a chunk header
# followed by msgpack that may or may not match a schema.
valid_plaintexts = st.one_of(
    st.binary(min_size=8, max_size=8).map(lambda n: REGISTRY.encode(PING(nonce=n))),
    st.text(max_size=64)
    .filter(lambda a: len(a.encode()) <= 64)
    .map(lambda a: REGISTRY.encode(HELLO(agent=a))),
    st.binary(max_size=200).map(lambda body: REGISTRY.encode(DOC(body=body))),
).map(lambda encoded: b"\x00" + encoded)
hostile_plaintexts = st.one_of(
    st.binary(max_size=300),
    valid_plaintexts,
    st.tuples(st.sampled_from([b"\x00", b"\x01", b"\x03"]), message_like | msgpack_values).map(
        lambda p: p[0] + msgpack.packb(p[1], use_bin_type=True)
    ),
)


@FUZZ
@given(st.lists(hostile_plaintexts, min_size=1, max_size=5))
def test_authenticated_peer_sending_garbage_plaintext_only_causes_wire_error(
    plaintexts: list[bytes],
) -> None:
    """A peer with valid keys but a hostile encoder: the parser behind the AEAD is exposed."""
    a, b = _fresh_open_pair()
    assert a._send is not None
    for plaintext in plaintexts:
        frame = a._send.encrypt(plaintext)
        try:
            events = b.receive_frame(frame)
        except WireError as error:
            hypothesis.event(f"rejected: {type(error).__name__}")
            assert b.state is ChannelState.ERROR
            return
        for event in events:
            event_name = type(event).__name__
            hypothesis.event(f"delivered {event_name}")
            if isinstance(event, MessageReceived):
                REGISTRY._type_of(event.message.type).validate(event.message.fields)


@FUZZ
@given(message_like | msgpack_values)
def test_schema_decoder_accepts_only_valid_shapes(obj: object) -> None:
    data = msgpack.packb(obj, use_bin_type=True)
    try:
        message = REGISTRY.decode(data)
    except SchemaError:
        hypothesis.event("rejected")
        return
    hypothesis.event(f"accepted {message.type}")
    assert REGISTRY.decode(REGISTRY.encode(message)) == message


@FUZZ
@given(st.binary(max_size=500))
def test_schema_decoder_on_random_bytes_only_raises_schema_error(data: bytes) -> None:
    with contextlib.suppress(SchemaError):
        REGISTRY.decode(data)


@FUZZ
@given(st.lists(st.binary(max_size=70_000), min_size=1, max_size=4))
def test_reassembler_only_raises_frame_error(plaintexts: list[bytes]) -> None:
    reassembler = Reassembler(max_message_size=100_000)
    try:
        for plaintext in plaintexts:
            message = reassembler.feed(plaintext)
            assert message is None or len(message) <= 100_000
    except FrameError:
        pass


@FUZZ
@given(
    st.lists(st.binary(min_size=1, max_size=3000), max_size=5),
    st.lists(st.integers(1, 5000), min_size=1, max_size=10),
)
def test_length_prefix_decoder_reassembles_any_split(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(length_prefixed(frame) for frame in frames)
    decoder = LengthPrefixDecoder()
    out: list[bytes] = []
    position = 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[position : position + cut])
        position += cut
    out += decoder.feed(stream[position:])
    assert out == frames


@FUZZ
@given(st.binary(max_size=1000))
def test_length_prefix_decoder_on_random_bytes_only_raises_frame_error(data: bytes) -> None:
    try:
        for frame in LengthPrefixDecoder().feed(data):
            assert 0 < len(frame) <= 65535
    except FrameError:
        pass
