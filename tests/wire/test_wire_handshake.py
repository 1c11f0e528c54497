"""Identity-bound Noise XX handshake: who may connect, and what is refused."""

from __future__ import annotations

import dataclasses

import pytest

from wire import (
    PING,
    ChannelState,
    DecryptError,
    DeviceCertificate,
    DeviceCredentials,
    HandshakeComplete,
    HandshakeError,
    IdentityError,
    KeyPair,
    SecureChannel,
    WireError,
)
from wire.testing import TestIdentity, new_device, open_channel_pair


def _run_until_message2(initiator: SecureChannel, responder: SecureChannel) -> tuple[bytes, bytes]:
    message1 = initiator.initiate()
    assert responder.receive_frame(message1) == []
    (message2,) = responder.frames_to_send()
    return message1, message2


def _forged_credentials(
    identity_public_key: bytes, signer: TestIdentity, static_key: KeyPair
) -> DeviceCredentials:
    """Credentials claiming ``identity_public_key`` but signed by someone else."""
    signature = signer.sign(DeviceCertificate.signing_message(static_key.public))
    certificate = DeviceCertificate(identity_public_key, bytes(16), static_key.public, signature)
    credentials = object.__new__(DeviceCredentials)  # skip the local self-check on purpose
    object.__setattr__(credentials, "static_key", static_key)
    object.__setattr__(credentials, "certificate", certificate)
    object.__setattr__(credentials, "psk", None)
    object.__setattr__(credentials, "storage", None)
    return credentials


def test_both_sides_learn_each_others_identity_and_device() -> None:
    alice, bob = TestIdentity.generate(), TestIdentity.generate()
    laptop, server = alice.new_device(), bob.new_device()
    a, b = open_channel_pair(laptop, server)
    assert a.state is b.state is ChannelState.OPEN
    assert a.peer is not None and b.peer is not None
    assert a.peer.identity_public_key == bob.public_key
    assert a.peer.device_id == server.certificate.device_id
    assert a.peer.noise_static_public_key == server.static_key.public
    assert b.peer.identity_public_key == alice.public_key
    assert b.peer.device_id == laptop.certificate.device_id
    assert a.handshake_hash == b.handshake_hash


def test_dialing_a_pinned_identity_succeeds_when_it_answers() -> None:
    bob = TestIdentity.generate()
    server = bob.new_device()
    a = SecureChannel(
        new_device(),
        initiator=True,
        expected_identity=bob.public_key,
        expected_device_id=server.certificate.device_id,
    )
    b = SecureChannel(server, initiator=False)
    _, message2 = _run_until_message2(a, b)
    events = a.receive_frame(message2)
    assert isinstance(events[0], HandshakeComplete)
    assert events[0].peer.identity_public_key == bob.public_key


def test_wrong_identity_is_refused_before_the_initiator_sends_anything_more() -> None:
    expected = TestIdentity.generate()
    a = SecureChannel(new_device(), initiator=True, expected_identity=expected.public_key)
    b = SecureChannel(new_device(), initiator=False)
    _, message2 = _run_until_message2(a, b)
    with pytest.raises(IdentityError, match="different identity"):
        a.receive_frame(message2)
    assert a.state is ChannelState.ERROR
    assert a.frames_to_send() == []  # no message 3: the impostor learns nothing about us
    with pytest.raises(WireError):
        a.send(PING(nonce=bytes(8)))


def test_wrong_device_of_the_right_identity_is_refused() -> None:
    bob = TestIdentity.generate()
    a = SecureChannel(
        new_device(),
        initiator=True,
        expected_identity=bob.public_key,
        expected_device_id=b"\x01" * 16,
    )
    b = SecureChannel(bob.new_device(), initiator=False)
    _, message2 = _run_until_message2(a, b)
    with pytest.raises(IdentityError, match="different device"):
        a.receive_frame(message2)


def test_responder_with_forged_certificate_is_refused() -> None:
    victim, forger = TestIdentity.generate(), TestIdentity.generate()
    a = SecureChannel(new_device(), initiator=True)
    b = SecureChannel(
        _forged_credentials(victim.public_key, forger, KeyPair.generate()), initiator=False
    )
    _, message2 = _run_until_message2(a, b)
    with pytest.raises(IdentityError, match="signature"):
        a.receive_frame(message2)


def test_initiator_with_forged_certificate_never_reaches_open() -> None:
    victim, forger = TestIdentity.generate(), TestIdentity.generate()
    a = SecureChannel(
        _forged_credentials(victim.public_key, forger, KeyPair.generate()), initiator=True
    )
    b = SecureChannel(new_device(), initiator=False)
    _, message2 = _run_until_message2(a, b)
    a.receive_frame(message2)
    (message3,) = a.frames_to_send()
    with pytest.raises(IdentityError):
        b.receive_frame(message3)
    assert b.state is ChannelState.ERROR
    assert b.peer is None


def test_certificate_copied_from_another_device_is_refused() -> None:
    """A genuine certificate is bound to its device's Noise key; it cannot be reused."""
    alice = TestIdentity.generate()
    genuine = alice.new_device()
    thief_key = KeyPair.generate()
    stolen = object.__new__(DeviceCredentials)
    object.__setattr__(stolen, "static_key", thief_key)
    object.__setattr__(stolen, "certificate", genuine.certificate)
    object.__setattr__(stolen, "psk", None)
    object.__setattr__(stolen, "storage", None)
    a = SecureChannel(new_device(), initiator=True, expected_identity=alice.public_key)
    b = SecureChannel(stolen, initiator=False)
    _, message2 = _run_until_message2(a, b)
    with pytest.raises(IdentityError, match="signature"):
        a.receive_frame(message2)


def test_credentials_refuse_a_certificate_for_another_key() -> None:
    device = new_device()
    with pytest.raises(IdentityError, match="different Noise static key"):
        DeviceCredentials(KeyPair.generate(), device.certificate)


def test_certificate_issue_refuses_a_bad_signer() -> None:
    alice, mallory = TestIdentity.generate(), TestIdentity.generate()
    with pytest.raises(IdentityError):
        DeviceCertificate.issue(mallory.sign, alice.public_key, bytes(16), bytes(32))


@pytest.mark.parametrize(
    "field", ["identity_public_key", "device_id", "noise_static_public_key", "signature"]
)
def test_certificate_fields_have_exact_sizes(field: str) -> None:
    certificate = new_device().certificate
    with pytest.raises(IdentityError, match="bytes"):
        dataclasses.replace(certificate, **{field: b"short"})


def test_different_prologue_fails_the_handshake() -> None:
    a = SecureChannel(new_device(), initiator=True, prologue=b"dmgn/2")
    b = SecureChannel(new_device(), initiator=False)
    _, message2 = _run_until_message2(a, b)
    with pytest.raises(DecryptError):
        a.receive_frame(message2)


@pytest.mark.parametrize("size", [0, 1, 32, 34, 65])
def test_first_message_must_be_a_mode_byte_and_exactly_an_ephemeral_key(size: int) -> None:
    b = SecureChannel(new_device(), initiator=False)
    with pytest.raises(HandshakeError, match="a mode byte and one ephemeral key"):
        b.receive_frame(b"\x02" * size)
    assert b.state is ChannelState.ERROR


def test_low_order_ephemeral_key_is_refused() -> None:
    b = SecureChannel(new_device(), initiator=False)
    with pytest.raises(HandshakeError, match="low-order"):
        b.receive_frame(b"\x02" + bytes(32))


def test_handshake_messages_out_of_turn_are_refused() -> None:
    a = SecureChannel(new_device(), initiator=True)
    b = SecureChannel(new_device(), initiator=False)
    with pytest.raises(HandshakeError):
        a.receive_frame(bytes(32))  # the initiator must speak first
    with pytest.raises(HandshakeError):
        b.initiate()


def test_replayed_message2_is_refused_by_a_new_initiator() -> None:
    b = SecureChannel(new_device(), initiator=False)
    _, message2 = _run_until_message2(SecureChannel(new_device(), initiator=True), b)
    other = SecureChannel(new_device(), initiator=True)
    other.initiate()
    with pytest.raises(DecryptError):
        other.receive_frame(message2)


def test_application_data_before_handshake_is_refused() -> None:
    a = SecureChannel(new_device(), initiator=True)
    with pytest.raises(WireError):
        a.send(PING(nonce=bytes(8)))
    assert a.state is ChannelState.ERROR


def test_oversized_handshake_message_is_refused() -> None:
    a = SecureChannel(new_device(), initiator=True)
    a.initiate()
    with pytest.raises(HandshakeError, match="too large"):
        a.receive_frame(bytes(5000))
