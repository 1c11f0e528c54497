"""Device credentials with a PSK never show their identity in storage mode (review of issue
20 item 3): without storage credentials they refuse storage mode instead of falling back to
the device certificate."""

from __future__ import annotations

import pytest

from wire import ChannelState, DeviceCredentials, IdentityError, Mode, SecureChannel, WireError
from wire.testing import TestIdentity, new_storage_credentials


def _without_storage(me: TestIdentity) -> DeviceCredentials:
    device = me.new_device(storage=new_storage_credentials())
    return DeviceCredentials(device.static_key, device.certificate, psk=device.psk)


def test_psk_credentials_without_storage_credentials_refuse_to_dial_in_storage_mode() -> None:
    me = TestIdentity.generate()
    ours = _without_storage(me)
    with pytest.raises(IdentityError, match="no storage credentials"):
        _ = ours.for_storage
    with pytest.raises(IdentityError, match="no storage credentials"):
        SecureChannel(ours, initiator=True, mode=Mode.STORAGE)
    # Device mode is unaffected.
    assert SecureChannel(ours, initiator=True, mode=Mode.DEVICE).initiate()


def test_psk_credentials_without_storage_credentials_refuse_storage_handshakes() -> None:
    me, stranger = TestIdentity.generate(), TestIdentity.generate()
    responder = SecureChannel(_without_storage(me), initiator=False)
    dialer = SecureChannel(stranger.new_device(), initiator=True, mode=Mode.STORAGE)
    with pytest.raises(WireError, match="does not accept storage handshakes"):
        responder.receive_frame(dialer.initiate())
    assert responder.frames_to_send() == []  # message 2 (our certificate) never left
    assert responder.state is ChannelState.ERROR


def test_storage_credentials_or_an_explicit_test_flag_present_something() -> None:
    me = TestIdentity.generate()
    storage = new_storage_credentials()
    assert me.new_device(storage=storage).for_storage is storage
    tools = me.new_device()  # wire.testing says so explicitly: storage_is_device
    assert tools.storage_is_device and tools.for_storage is tools
    with pytest.raises(IdentityError, match="not both"):
        DeviceCredentials(
            tools.static_key,
            tools.certificate,
            psk=tools.psk,
            storage=storage,
            storage_is_device=True,
        )
