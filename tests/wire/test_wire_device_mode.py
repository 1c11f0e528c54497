"""Device mode (Noise XXpsk3, issue 20): only holders of the identity's PSK complete it, and
nobody else ever sees a certificate; the mode byte picks device or storage handshakes."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wire import (
    BASE_REGISTRY,
    PING,
    Bytes,
    ChannelState,
    DeviceCredentials,
    DeviceRefused,
    HandshakeComplete,
    HandshakeError,
    IdentityError,
    MessageReceived,
    MessageType,
    Mode,
    SecureChannel,
    Suite,
    SuiteRefused,
    WireError,
)
from wire._handshake import DeviceCertificate
from wire._noise import KeyPair
from wire.testing import TestIdentity, new_storage_credentials, open_channel_pair


def _frames(sender: SecureChannel) -> list[bytes]:
    return sender.frames_to_send()


def test_two_devices_of_one_identity_complete_the_device_handshake() -> None:
    me = TestIdentity.generate()
    a, b = open_channel_pair(me.new_device(), me.new_device(), mode=Mode.DEVICE)
    assert a.mode is b.mode is Mode.DEVICE
    assert a.peer is not None and b.peer is not None
    assert a.peer.identity_public_key == b.peer.identity_public_key == me.public_key
    assert a.handshake_hash == b.handshake_hash
    # The certificate travelled as transport message 0; the rekey counters still agree.
    for _ in range(3):
        (frame,) = a.send(PING(nonce=bytes(8)))
        assert b.receive_frame(frame) == [MessageReceived(PING(nonce=bytes(8)))]
        (frame,) = b.send(PING(nonce=bytes(8)))
        assert a.receive_frame(frame) == [MessageReceived(PING(nonce=bytes(8)))]


def _device_transcript(
    initiator: DeviceCredentials, responder: DeviceCredentials
) -> tuple[SecureChannel, SecureChannel, list[bytes], str]:
    """Run a device handshake as far as it goes; return both channels and every frame sent."""
    a = SecureChannel(initiator, initiator=True, mode=Mode.DEVICE)
    b = SecureChannel(responder, initiator=False)
    sent: list[bytes] = []
    error = ""
    try:
        sent.append(a.initiate())
        b.receive_frame(sent[-1])
        sent.extend(_frames(b))
        a.receive_frame(sent[-1])
        sent.extend(_frames(a))
        b.receive_frame(sent[-1])
        sent.extend(_frames(b))
        a.receive_frame(sent[-1])
    except WireError as failure:
        error = str(failure)
    return a, b, sent, error


def test_a_stranger_dialing_our_device_learns_nothing_and_is_refused() -> None:
    me, stranger = TestIdentity.generate(), TestIdentity.generate()
    ours = me.new_device()
    a, b, sent, error = _device_transcript(stranger.new_device(), ours)
    assert b.state is ChannelState.ERROR  # message 3 failed the PSK
    assert "different identity" in error  # the close reason the stranger gets names nobody
    assert a.state is ChannelState.HANDSHAKING and a.peer is None
    assert b.peer is None
    # Our side sent exactly message 2, which carries no payload (e, s and two tags).
    assert len(sent) == 3 and len(sent[1]) == 32 + 32 + 16 + 16
    assert not any(me.public_key in frame for frame in sent)
    assert not any(ours.certificate.device_id in frame for frame in sent)


def test_our_device_dialing_a_stranger_shows_it_nothing() -> None:
    me, stranger = TestIdentity.generate(), TestIdentity.generate()
    a, b, _, error = _device_transcript(me.new_device(), stranger.new_device())
    assert "different identity" in error
    # The stranger cannot decrypt message 3 (our certificate) and never sends its own.
    assert b.state is ChannelState.ERROR and b.peer is None
    assert a.peer is None and a.state is not ChannelState.OPEN


def test_a_device_certificate_of_another_identity_under_our_psk_is_refused() -> None:
    me, other = TestIdentity.generate(), TestIdentity.generate()
    forged = other.new_device()
    # Same PSK as ours but certified by another identity (only a seed holder could do this).
    forged = DeviceCredentials(forged.static_key, forged.certificate, psk=me.psk)
    b = SecureChannel(me.new_device(), initiator=False)
    a = SecureChannel(forged, initiator=True, mode=Mode.DEVICE)
    b.receive_frame(a.initiate())
    a.receive_frame(_frames(b)[0])
    with pytest.raises(IdentityError, match="different identity"):
        b.receive_frame(_frames(a)[0])
    assert _frames(b) == []  # our certificate was never sent


def test_storage_mode_presents_the_storage_key_not_the_identity() -> None:
    me, stranger = TestIdentity.generate(), TestIdentity.generate()
    storage = new_storage_credentials()
    ours = me.new_device(storage=storage)
    a, b = open_channel_pair(stranger.new_device(), ours, mode=Mode.STORAGE)
    assert b.mode is Mode.STORAGE
    assert a.peer is not None
    assert a.peer.identity_public_key == storage.certificate.identity_public_key
    assert a.peer.identity_public_key != me.public_key
    assert a.peer.device_id != ours.certificate.device_id
    assert a.peer.noise_static_public_key != ours.static_key.public


def test_the_device_handshake_needs_a_psk_on_both_sides() -> None:
    me = TestIdentity.generate()
    no_psk = _credentials_without_psk(me)
    with pytest.raises(ValueError, match="PSK"):
        SecureChannel(no_psk, initiator=True, mode=Mode.DEVICE)
    b = SecureChannel(_credentials_without_psk(me), initiator=False)
    a = SecureChannel(me.new_device(), initiator=True, mode=Mode.DEVICE)
    with pytest.raises(HandshakeError, match="does not accept device handshakes"):
        b.receive_frame(a.initiate())


def _credentials_without_psk(identity: TestIdentity) -> DeviceCredentials:
    static = KeyPair.generate()
    certificate = DeviceCertificate.issue(
        identity.sign, identity.public_key, bytes(16), static.public
    )
    return DeviceCredentials(static, certificate)


@settings(deadline=None)
@given(
    st.integers(0, 255).filter(lambda b: b not in {m | s for m in Mode for s in Suite}),
    st.binary(),
)
def test_an_unknown_mode_byte_is_refused_with_its_value(byte: int, rest: bytes) -> None:
    b = SecureChannel(TestIdentity.generate().new_device(), initiator=False)
    with pytest.raises(HandshakeError, match=f"unknown handshake mode 0x{byte:02x}"):
        b.receive_frame(bytes([byte]) + rest)
    assert b.state is ChannelState.ERROR and _frames(b) == []


def test_changing_the_mode_byte_in_flight_fails_the_handshake() -> None:
    """Device mode's message 1 relabelled as storage (tag stripped): the prologue differs,
    so the responder's message 2 does not decrypt at the initiator."""
    me = TestIdentity.generate()
    a = SecureChannel(me.new_device(), initiator=True, mode=Mode.DEVICE)
    b = SecureChannel(me.new_device(), initiator=False)
    message1 = a.initiate()
    b.receive_frame(bytes([Mode.STORAGE]) + message1[1:33])
    with pytest.raises(WireError):
        a.receive_frame(_frames(b)[0])
    assert a.peer is None


_ME = TestIdentity.generate()


def _fresh_pair() -> tuple[SecureChannel, SecureChannel]:
    return (
        SecureChannel(_ME.new_device(), initiator=True, mode=Mode.DEVICE),
        SecureChannel(_ME.new_device(), initiator=False),
    )


_PAIR = _fresh_pair()


@settings(deadline=None)  # a loaded machine: timing is not what this test checks
@given(st.data())
def test_tampered_device_handshake_messages_never_complete(data: st.DataObject) -> None:
    """Tamper with message 1, 2, 3 or the responder's certificate on the way."""
    a, b = copy.deepcopy(_PAIR)
    index = data.draw(st.sampled_from([0, 1, 2, 3]))

    def deliver(position: int, message: bytes) -> bytes:
        if position != index:
            return message
        n = len(message)
        flip = st.tuples(st.integers(0, n - 1), st.integers(1, 255)).map(
            lambda p: message[: p[0]] + bytes([message[p[0]] ^ p[1]]) + message[p[0] + 1 :]
        )
        cut = st.integers(0, n - 1).map(lambda k: message[:k])
        return data.draw(st.one_of(flip, cut))

    completed = 0
    try:
        b.receive_frame(deliver(0, a.initiate()))
        a.receive_frame(deliver(1, _frames(b)[0]))
        events = b.receive_frame(deliver(2, _frames(a)[0]))
        completed += any(isinstance(event, HandshakeComplete) for event in events)
        events = a.receive_frame(deliver(3, _frames(b)[0]))
        completed += any(isinstance(event, HandshakeComplete) for event in events)
    except WireError:
        pass
    assert completed < 2, "a tampered device handshake must not complete on both sides"
    if index < 3:
        assert completed == 0


# -- issue 17: the cipher suite, chosen by the initiator in the first byte's high bits --


_BLOB = MessageType("test.blob", {"data": Bytes(1 << 20)})
_REGISTRY = BASE_REGISTRY.extended(_BLOB)


def _frame_sizes(mode: Mode, suite: Suite) -> list[list[int]]:
    me = TestIdentity.generate()
    a, b = open_channel_pair(
        me.new_device(), me.new_device(), mode=mode, suite=suite, registry=_REGISTRY
    )
    assert (a.mode, a.suite) == (b.mode, b.suite) == (mode, suite)
    sizes = []
    for message in (PING(nonce=bytes(8)), _BLOB(data=bytes(1000)), _BLOB(data=bytes(70_000))):
        frames = a.send(message)
        sizes.append([len(f) for f in frames])
        events = [e for f in frames for e in b.receive_frame(f)]
        assert isinstance(events[-1], MessageReceived) and events[-1].message == message
    return sizes


@pytest.mark.parametrize("mode", list(Mode))
def test_every_mode_completes_in_every_suite_and_the_responder_takes_the_initiators(
    mode: Mode,
) -> None:
    chacha, aes = _frame_sizes(mode, Suite.CHACHAPOLY), _frame_sizes(mode, Suite.AESGCM)
    # Both suites have 16-byte tags: frame sizes (what an observer sees) do not name the suite.
    assert chacha == aes
    assert [len(frames) for frames in aes] == [1, 1, 2]


def test_the_suites_are_different_ciphers_on_the_wire() -> None:
    me = TestIdentity.generate()
    device = me.new_device()
    a, b = open_channel_pair(device, me.new_device(), suite=Suite.CHACHAPOLY)
    c, d = open_channel_pair(device, me.new_device(), suite=Suite.AESGCM)
    # A ChaChaPoly frame is refused by an AES-GCM session and the other way round: the suite
    # really is the cipher, not a label (the keys differ too, so this is only a smoke check).
    with pytest.raises(WireError):
        d.receive_frame(a.send(PING(nonce=bytes(8)))[0])
    with pytest.raises(WireError):
        b.receive_frame(c.send(PING(nonce=bytes(8)))[0])


@pytest.mark.parametrize(
    ("chosen", "rewritten"), [(Suite.AESGCM, Suite.CHACHAPOLY), (Suite.CHACHAPOLY, Suite.AESGCM)]
)
@pytest.mark.parametrize("mode", list(Mode))
def test_changing_the_suite_bits_in_flight_fails_the_handshake(
    mode: Mode, chosen: Suite, rewritten: Suite
) -> None:
    """The first byte is in the prologue: an attacker who rewrites the suite (a downgrade,
    or just damage) fails the handshake - at message 1 in device mode (its empty payload
    carries a tag under the PSK-era keys), at message 2 in storage mode."""
    me = TestIdentity.generate()
    a = SecureChannel(me.new_device(), initiator=True, mode=mode, suite=chosen)
    b = SecureChannel(me.new_device(), initiator=False, accept_suites=frozenset(Suite))
    message1 = a.initiate()
    assert message1[0] == mode | chosen
    with pytest.raises(WireError):
        b.receive_frame(bytes([mode | rewritten]) + message1[1:])
        assert b.suite is rewritten
        a.receive_frame(_frames(b)[0])
    assert a.peer is None and b.peer is None
    assert ChannelState.ERROR in (a.state, b.state)


def test_the_preferred_suite_is_a_suite_and_is_used_when_none_is_asked_for() -> None:
    from wire import preferred_suite

    me = TestIdentity.generate()
    a = SecureChannel(me.new_device(), initiator=True)
    assert isinstance(preferred_suite(), Suite)
    assert a.suite is preferred_suite()
    assert a.initiate()[0] == Mode.STORAGE | preferred_suite()


@pytest.mark.parametrize("suite", list(Suite))
@pytest.mark.parametrize("mode", list(Mode))
def test_each_suite_is_its_own_cipher_in_both_directions(mode: Mode, suite: Suite) -> None:
    """White box: the session's cipher functions are the suite's, and a transport frame at
    n >= 1 opens with the raw AEAD under the session key and the suite's nonce encoding."""
    from wire._noise import CIPHERS
    from wire._secure_channel import _PROTOCOLS

    assert _PROTOCOLS[mode, suite].cipher is CIPHERS[suite.cipher_name]
    me = TestIdentity.generate()
    a, b = open_channel_pair(me.new_device(), me.new_device(), mode=mode, suite=suite)
    for sender in (a, b):
        direction = sender._send
        assert direction is not None
        cipher = direction._cipher
        assert cipher.functions is CIPHERS[suite.cipher_name]
        sender.send(PING(nonce=bytes(8)))  # n moves past 0 (device mode used n = 0 already)
        n = cipher.nonce
        (frame,) = sender.send(PING(nonce=b"12345678"))
        order = "big" if suite is Suite.AESGCM else "little"
        nonce = bytes(4) + n.to_bytes(8, order)
        assert cipher._k is not None
        plaintext = CIPHERS[suite.cipher_name].aead(cipher._k).decrypt(nonce, frame, b"")
        assert plaintext[0] == 0 and b"12345678" in plaintext


def test_a_node_without_fast_aes_refuses_aes_at_message_one_and_names_nobody() -> None:
    me = TestIdentity.generate()
    a = SecureChannel(me.new_device(), initiator=True, mode=Mode.STORAGE, suite=Suite.AESGCM)
    b = SecureChannel(me.new_device(), initiator=False, accept_suites=frozenset({Suite.CHACHAPOLY}))
    with pytest.raises(SuiteRefused, match="AESGCM") as refused:
        b.receive_frame(a.initiate())
    assert me.public_key.hex()[:8] not in str(refused.value)
    assert b.state is ChannelState.ERROR and _frames(b) == []
    # The suite every node takes goes through.
    c, d = open_channel_pair(me.new_device(), me.new_device(), suite=Suite.CHACHAPOLY)
    assert c.suite is d.suite is Suite.CHACHAPOLY


def test_the_suite_bits_are_refused_when_unknown_but_not_as_a_device_refusal() -> None:
    # 0x21: an unknown suite with device mode must not read as "not one of our devices"
    # (close code 4001 would send an initiator on to storage mode).
    b = SecureChannel(TestIdentity.generate().new_device(), initiator=False)
    with pytest.raises(HandshakeError, match="unknown handshake mode 0x21") as refused:
        b.receive_frame(bytes([0x21]) + bytes(48))
    assert not isinstance(refused.value, (SuiteRefused, DeviceRefused))
