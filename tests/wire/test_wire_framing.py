"""Chunking into Noise-sized pieces, reassembly caps, and length-prefixed streams."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wire import (
    MAX_CHUNK_PAYLOAD,
    MAX_FRAME_SIZE,
    FrameError,
    LengthPrefixDecoder,
    MessageType,
    Reassembler,
    SchemaRegistry,
    chunk_message,
    length_prefixed,
)
from wire._messages import Value


@pytest.mark.parametrize(
    "size", [0, 1, MAX_CHUNK_PAYLOAD, MAX_CHUNK_PAYLOAD + 1, 3 * MAX_CHUNK_PAYLOAD]
)
def test_chunks_fit_a_noise_message_and_reassemble(size: int) -> None:
    data = bytes(i % 251 for i in range(size))
    chunks = chunk_message(data)
    assert all(len(chunk) + 16 <= MAX_FRAME_SIZE for chunk in chunks)
    assert len(chunks) == max(1, -(-size // MAX_CHUNK_PAYLOAD))
    reassembler = Reassembler()
    results = [reassembler.feed(chunk) for chunk in chunks]
    assert results[:-1] == [None] * (len(chunks) - 1)
    assert results[-1] == data
    assert reassembler.pending_bytes == 0


def test_reserved_header_bits_are_refused() -> None:
    with pytest.raises(FrameError, match="reserved"):
        Reassembler().feed(b"\x02hello")


def test_empty_plaintext_is_refused() -> None:
    with pytest.raises(FrameError, match="header"):
        Reassembler().feed(b"")


def test_short_non_final_chunk_is_refused() -> None:
    with pytest.raises(FrameError, match="full size"):
        Reassembler().feed(b"\x01" + bytes(10))


def test_empty_final_chunk_after_full_chunks_is_refused() -> None:
    reassembler = Reassembler()
    reassembler.feed(b"\x01" + bytes(MAX_CHUNK_PAYLOAD))
    with pytest.raises(FrameError, match="canonical"):
        reassembler.feed(b"\x00")


def test_total_cap_is_enforced_at_the_chunk_that_crosses_it() -> None:
    reassembler = Reassembler(max_message_size=2 * MAX_CHUNK_PAYLOAD)
    full = b"\x01" + bytes(MAX_CHUNK_PAYLOAD)
    assert reassembler.feed(full) is None
    assert reassembler.feed(full) is None
    with pytest.raises(FrameError, match="cap"):
        reassembler.feed(b"\x00x")
    assert reassembler.pending_bytes == 2 * MAX_CHUNK_PAYLOAD


def test_length_prefixed_frames_survive_any_split() -> None:
    frames = [b"a", bytes(300), bytes(range(256)) * 10]
    stream = b"".join(length_prefixed(frame) for frame in frames)
    for step in (1, 2, 3, 7, 1000, len(stream)):
        decoder = LengthPrefixDecoder()
        out = []
        for i in range(0, len(stream), step):
            out += decoder.feed(stream[i : i + step])
        assert out == frames
        assert decoder.buffered == 0


def test_length_prefix_refuses_empty_and_oversize_frames() -> None:
    with pytest.raises(FrameError):
        length_prefixed(b"")
    with pytest.raises(FrameError):
        length_prefixed(bytes(MAX_FRAME_SIZE + 1))
    with pytest.raises(FrameError, match="zero-length"):
        LengthPrefixDecoder().feed(b"\x00\x00")


@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=7))
def test_frames_packed_for_websocket_come_back_whole_and_in_order(frames: list[bytes]) -> None:
    from wire._framing import MAX_FRAMES_PER_WS_MESSAGE, pack_frames, unpack_frames

    payloads = pack_frames(frames)
    assert len(payloads) == -(-len(frames) // MAX_FRAMES_PER_WS_MESSAGE)
    assert [f for p in payloads for f in unpack_frames(p)] == frames


def test_two_full_frames_fit_one_websocket_message() -> None:
    from wire._framing import MAX_WS_MESSAGE_SIZE, pack_frames, unpack_frames

    full = [bytes(MAX_FRAME_SIZE), bytes(MAX_FRAME_SIZE)]
    (payload,) = pack_frames(full)
    assert len(payload) == MAX_WS_MESSAGE_SIZE
    assert unpack_frames(payload) == full
    with pytest.raises(FrameError):
        unpack_frames(payload + b"\x00\x01x")  # a third frame


@given(st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=7))
def test_packing_is_each_frames_length_prefix_then_the_frame(frames: list[bytes]) -> None:
    # One join per WebSocket message (issue 17) makes exactly the bytes prefixing and
    # concatenating each frame made before.
    from wire._framing import MAX_FRAMES_PER_WS_MESSAGE, pack_frames

    step = MAX_FRAMES_PER_WS_MESSAGE
    expected = [
        b"".join(length_prefixed(f) for f in frames[i : i + step])
        for i in range(0, len(frames), step)
    ]
    assert pack_frames(frames) == expected


def test_packing_refuses_empty_and_oversize_frames_before_sending_any() -> None:
    from wire._framing import pack_frames

    for bad in (b"", bytes(MAX_FRAME_SIZE + 1)):
        with pytest.raises(FrameError, match="cannot be sent"):
            pack_frames([b"fine", bad])


def test_a_one_chunk_message_is_handed_over_without_a_copy() -> None:
    plaintext = b"\x00" + b"payload"
    message = Reassembler().feed(plaintext)
    assert isinstance(message, memoryview) and message.obj is plaintext
    assert message == b"payload"


@pytest.mark.parametrize("chunks", [2, 3])
def test_chunks_of_a_longer_message_are_joined_once_into_bytes(chunks: int) -> None:
    data = bytes(i % 253 for i in range(chunks * MAX_CHUNK_PAYLOAD - 7))
    reassembler = Reassembler()
    results = [reassembler.feed(chunk) for chunk in chunk_message(data)]
    assert results[:-1] == [None] * (chunks - 1)
    assert isinstance(results[-1], bytes) and results[-1] == data
    assert reassembler.pending_bytes == 0


def test_a_view_decodes_like_bytes() -> None:
    from wire import BASE_REGISTRY
    from wire._messages import PING

    encoded = BASE_REGISTRY.encode(PING(nonce=b"12345678"))
    view = Reassembler().feed(b"\x00" + encoded)
    assert view is not None
    assert BASE_REGISTRY.decode(view) == BASE_REGISTRY.decode(encoded)


# -- issue 17: the send path builds plaintexts without copying the message behind a header --


def _blob_registry() -> tuple[SchemaRegistry, MessageType]:
    from wire import BASE_REGISTRY, Bytes, Str
    from wire._messages import ListOf

    blob = MessageType(
        "test.blob",
        {"data": Bytes(4 * 1024 * 1024), "words": ListOf(Str(16), max_items=40_000)},
        optional=frozenset({"data", "words"}),
    )
    return BASE_REGISTRY.extended(blob), blob


@given(
    size=st.sampled_from(
        [0, 1, MAX_CHUNK_PAYLOAD - 40, MAX_CHUNK_PAYLOAD, MAX_CHUNK_PAYLOAD + 1, 65_536, 200_000]
    ),
    words=st.sampled_from([0, 3, 9_000]),
    header=st.sampled_from([0, 1]),
)
def test_chunks_built_behind_a_header_equal_the_plain_chunking_byte_for_byte(
    size: int, words: int, header: int
) -> None:
    # Whatever header the caller guessed (right or wrong), the plaintexts are exactly those
    # of encode + chunk_message: the wire format does not change.
    from wire._framing import chunk_encoded

    registry, blob = _blob_registry()
    fields: dict[str, Value] = {}
    if size:
        fields["data"] = bytes(i % 241 for i in range(size))
    if words:
        fields["words"] = [f"w{i:05d}" for i in range(words)]  # list-heavy: no bytes or str
    message = blob(**fields)
    encoded = registry.encode(message)
    behind = registry.encode_behind(header, message)
    assert bytes(behind) == bytes([header]) + encoded
    assert [bytes(c) for c in chunk_encoded(behind)] == chunk_message(encoded)


def test_a_message_in_one_chunk_is_encrypted_from_the_encoders_buffer() -> None:
    from wire._framing import chunk_encoded

    registry, blob = _blob_registry()
    behind = registry.encode_behind(0, blob(data=b"x" * 1000))
    (only,) = chunk_encoded(behind)
    assert only is behind  # no copy behind the header
    first = chunk_encoded(registry.encode_behind(1, blob(data=bytes(70_000))))[0]
    assert isinstance(first, memoryview) and len(first) == 1 + MAX_CHUNK_PAYLOAD


def test_only_0_and_1_can_lead_an_encoding() -> None:
    from wire import BASE_REGISTRY
    from wire._messages import PING

    with pytest.raises(ValueError, match="0 or 1"):
        BASE_REGISTRY.encode_behind(2, PING(nonce=bytes(8)))


def test_websocket_frames_are_views_of_the_message_not_copies() -> None:
    from wire._framing import pack_frames, unpack_frames

    (payload,) = pack_frames([b"first", b"second"])
    frames = unpack_frames(payload)
    assert all(isinstance(f, memoryview) and f.obj is payload for f in frames)
    assert [bytes(f) for f in frames] == [b"first", b"second"]
