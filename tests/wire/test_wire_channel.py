"""The OPEN secure channel: confidentiality, integrity, ordering, limits, rekey, close."""

from __future__ import annotations

import pytest

from wire import (
    BASE_REGISTRY,
    MAX_FRAME_SIZE,
    PING,
    Bytes,
    ChannelState,
    CipherState,
    CloseCode,
    CloseReceived,
    DecryptError,
    FrameError,
    MessageReceived,
    MessageType,
    NonceExhausted,
    SchemaError,
    SecureChannel,
    WireError,
)
from wire.testing import new_device, open_channel_pair

BLOB = MessageType("test.blob", {"data": Bytes(4 * 1024 * 1024)})
REGISTRY = BASE_REGISTRY.extended(BLOB)


def _pair(**kwargs: int) -> tuple[SecureChannel, SecureChannel]:
    return open_channel_pair(new_device(), new_device(), registry=REGISTRY, **kwargs)


def _received(channel: SecureChannel, frames: list[bytes]) -> list[MessageReceived]:
    events = [event for frame in frames for event in channel.receive_frame(frame)]
    assert all(isinstance(event, MessageReceived) for event in events)
    return [event for event in events if isinstance(event, MessageReceived)]


def test_messages_flow_both_ways_in_order() -> None:
    a, b = _pair()
    for i in range(5):
        (got,) = _received(b, a.send(PING(nonce=i.to_bytes(8, "big"))))
        assert got.message.get_bytes("nonce") == i.to_bytes(8, "big")
        (back,) = _received(a, b.send(BLOB(data=bytes([i]) * 100)))
        assert back.message.get_bytes("data") == bytes([i]) * 100


def test_ciphertext_does_not_contain_the_plaintext() -> None:
    a, _ = _pair()
    secret = b"my secret memory" * 4
    (frame,) = a.send(BLOB(data=secret))
    assert b"my secret memory" not in frame


@pytest.mark.parametrize("size", [0, 65000, 65518, 65519, 200_000, 3 * 65518])
def test_large_messages_are_chunked_and_reassembled(size: int) -> None:
    a, b = _pair()
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frames = a.send(BLOB(data=payload))
    assert all(len(frame) <= MAX_FRAME_SIZE for frame in frames)
    (got,) = _received(b, frames)
    assert got.message.get_bytes("data") == payload


def test_replayed_frame_is_rejected() -> None:
    a, b = _pair()
    (frame,) = a.send(PING(nonce=bytes(8)))
    b.receive_frame(frame)
    with pytest.raises(DecryptError):
        b.receive_frame(frame)
    assert b.state is ChannelState.ERROR


def test_reordered_frames_are_rejected() -> None:
    a, b = _pair()
    (first,) = a.send(PING(nonce=bytes(8)))
    (second,) = a.send(PING(nonce=b"\x01" * 8))
    with pytest.raises(DecryptError):
        b.receive_frame(second)
    with pytest.raises(WireError):
        b.receive_frame(first)  # the channel is dead: even the right frame is refused


def test_dropped_frame_makes_the_next_one_fail() -> None:
    a, b = _pair()
    a.send(PING(nonce=bytes(8)))
    (second,) = a.send(PING(nonce=bytes(8)))
    with pytest.raises(DecryptError):
        b.receive_frame(second)


@pytest.mark.parametrize("keep", [0, 1, 16, 40])
def test_truncated_frame_is_rejected(keep: int) -> None:
    a, b = _pair()
    (frame,) = a.send(PING(nonce=bytes(8)))
    assert keep < len(frame)
    with pytest.raises(DecryptError):
        b.receive_frame(frame[:keep])


def test_every_single_bit_flip_is_rejected() -> None:
    a, _ = _pair()
    (frame,) = a.send(PING(nonce=bytes(8)))
    for bit in range(len(frame) * 8):
        # A fresh receiver per flip: the first failure kills a channel.
        sender, receiver = _pair()
        (frame,) = sender.send(PING(nonce=bytes(8)))
        flipped = bytearray(frame)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(DecryptError):
            receiver.receive_frame(bytes(flipped))


def test_frame_from_another_session_is_rejected() -> None:
    a, _ = _pair()
    _, other_b = _pair()
    (frame,) = a.send(PING(nonce=bytes(8)))
    with pytest.raises(DecryptError):
        other_b.receive_frame(frame)


def test_oversize_frame_is_rejected_before_decryption() -> None:
    _, b = _pair()
    with pytest.raises(FrameError, match="exceeds"):
        b.receive_frame(bytes(MAX_FRAME_SIZE + 1))


def test_message_over_the_receivers_cap_is_refused_without_buffering_it() -> None:
    small = SecureChannel(
        new_device(), initiator=False, registry=REGISTRY, max_message_size=100_000
    )
    big = SecureChannel(new_device(), initiator=True, registry=REGISTRY)
    small.receive_frame(big.initiate())
    big.receive_frame(small.frames_to_send()[0])
    small.receive_frame(big.frames_to_send()[0])
    frames = big.send(BLOB(data=bytes(300_000)))
    assert len(frames) == 5
    assert small.receive_frame(frames[0]) == []
    with pytest.raises(FrameError, match="cap"):
        small.receive_frame(frames[1])  # 2 x 65518 > 100000: refused at the second chunk


def test_sender_refuses_a_message_over_its_own_cap() -> None:
    a = SecureChannel(new_device(), initiator=True, registry=REGISTRY, max_message_size=1000)
    b = SecureChannel(new_device(), initiator=False, registry=REGISTRY)
    b.receive_frame(a.initiate())
    a.receive_frame(b.frames_to_send()[0])
    with pytest.raises(FrameError):
        a.send(BLOB(data=bytes(2000)))


def test_unknown_message_type_from_an_authenticated_peer_is_refused() -> None:
    sender = SecureChannel(new_device(), initiator=True, registry=REGISTRY)
    receiver = SecureChannel(new_device(), initiator=False)  # does not know test.blob
    receiver.receive_frame(sender.initiate())
    sender.receive_frame(receiver.frames_to_send()[0])
    receiver.receive_frame(sender.frames_to_send()[0])
    with pytest.raises(SchemaError, match="unknown message type"):
        receiver.receive_frame(sender.send(BLOB(data=b"x"))[0])
    assert receiver.state is ChannelState.ERROR


def test_rekey_happens_on_schedule_on_both_sides() -> None:
    a, b = _pair(rekey_interval=3)
    for i in range(10):
        (got,) = _received(b, a.send(PING(nonce=i.to_bytes(8, "big"))))
        assert got.message.get_bytes("nonce") == i.to_bytes(8, "big")


def test_peers_with_different_rekey_schedules_fail_at_the_first_rekey() -> None:
    """Proves rekeying actually changes the key (a no-op rekey would pass)."""
    a = SecureChannel(new_device(), initiator=True, rekey_interval=3)
    b = SecureChannel(new_device(), initiator=False, rekey_interval=1000)
    b.receive_frame(a.initiate())
    a.receive_frame(b.frames_to_send()[0])
    b.receive_frame(a.frames_to_send()[0])
    for _ in range(3):
        b.receive_frame(a.send(PING(nonce=bytes(8)))[0])
    with pytest.raises(DecryptError):
        b.receive_frame(a.send(PING(nonce=bytes(8)))[0])


def test_nonce_exhaustion_is_an_error_not_a_reuse() -> None:
    cipher = CipherState(bytes(32))
    cipher.set_nonce(2**64 - 2)
    cipher.encrypt_with_ad(b"", b"last allowed")
    with pytest.raises(NonceExhausted):
        cipher.encrypt_with_ad(b"", b"would reuse the reserved nonce")
    with pytest.raises(NonceExhausted):
        cipher.decrypt_with_ad(b"", bytes(32))


def test_channel_at_nonce_limit_refuses_to_send() -> None:
    a, _ = _pair()
    a._send._cipher.set_nonce(2**64 - 1)  # type: ignore[union-attr]
    with pytest.raises(NonceExhausted):
        a.send(PING(nonce=bytes(8)))
    assert a.state is ChannelState.ERROR


def test_close_delivers_code_and_reason_then_both_sides_are_closed() -> None:
    a, b = _pair()
    frames = a.close(CloseCode.GOING_AWAY, "shutting down")
    assert a.state is ChannelState.CLOSED
    events = b.receive_frame(frames[0])
    assert events == [CloseReceived(CloseCode.GOING_AWAY, "shutting down")]
    assert b.state is ChannelState.CLOSED
    with pytest.raises(WireError):
        b.receive_frame(frames[0])
    with pytest.raises(WireError):
        a.send(PING(nonce=bytes(8)))


def test_close_reason_is_truncated_to_fit_the_schema() -> None:
    a, b = _pair()
    (event,) = b.receive_frame(a.close(CloseCode.NORMAL, "é" * 1000)[0])
    assert isinstance(event, CloseReceived)
    assert len(event.reason.encode()) <= 256
    assert event.reason.startswith("éé")
