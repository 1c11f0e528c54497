"""The transport picks the handshake mode per dial and accepts both (issue 20): our own
identity -> device mode, another peer -> storage mode, nobody in particular -> device mode,
then storage mode. Strangers only ever see the storage key."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from actors.runtime import Err, Ok, call
from actors.transport import Dial, ListPeers, PeerInfo, PeerUp, TransportActor, TransportEvent
from wire import (
    CloseCode,
    ConnectionClosed,
    DeviceCredentials,
    MemoryNetwork,
    MessageStream,
    Mode,
    Suite,
    WireError,
    secure_connection,
)
from wire.testing import TestIdentity, new_storage_credentials

#: Set when the transport listening at an address reported its first PeerUp.
UP: dict[str, trio.Event] = {}


@asynccontextmanager
async def running(
    network: MemoryNetwork,
    address: str,
    credentials: DeviceCredentials,
    suites: tuple[Suite, ...] | None = None,
) -> AsyncIterator[TransportActor]:
    send, receive = trio.open_memory_channel[TransportEvent](64)
    actor = TransportActor(network, credentials, send, listen_addr=address, suites=suites)
    UP[address] = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drain, receive, UP[address])
        await nursery.start(actor.run)
        yield actor
        nursery.cancel_scope.cancel()


async def _drain(receive: trio.MemoryReceiveChannel[TransportEvent], up: trio.Event) -> None:
    async for event in receive:
        if isinstance(event, PeerUp):
            up.set()


async def _peers(actor: TransportActor) -> tuple[PeerInfo, ...]:
    result = await call(actor.address, ListPeers)
    assert isinstance(result, Ok)
    return result.value


async def test_a_bootstrap_dial_is_a_device_handshake_with_our_own_device() -> None:
    network = MemoryNetwork()
    me = TestIdentity.generate()
    home = me.new_device(storage=new_storage_credentials())
    laptop = me.new_device(storage=new_storage_credentials())
    async with running(network, "mem://home", home), running(network, "mem://laptop", laptop) as a:
        with trio.fail_after(30):
            result = await call(a.address, Dial, "mem://home", None, None)
        assert isinstance(result, Ok), result
        assert result.value.peer.identity_public_key == me.public_key
        assert result.value.peer.device_id == home.certificate.device_id


async def test_a_stranger_sees_only_our_storage_key_and_is_no_device() -> None:
    network = MemoryNetwork()
    me, stranger = TestIdentity.generate(), TestIdentity.generate()
    storage = new_storage_credentials()
    home = me.new_device(storage=storage)
    async with (
        running(network, "mem://home", home) as ours,
        running(network, "mem://stranger", stranger.new_device()) as theirs,
    ):
        with trio.fail_after(30):
            # Bootstrap-style: device mode fails (no PSK), storage mode connects.
            result = await call(theirs.address, Dial, "mem://home", None, None)
        assert isinstance(result, Ok), result
        shown = result.value.peer
        assert shown.identity_public_key == storage.certificate.identity_public_key
        assert shown.identity_public_key != me.public_key
        assert shown.device_id != home.certificate.device_id
        with trio.fail_after(30):
            await UP["mem://home"].wait()
        (inbound,) = await _peers(ours)
        assert inbound.peer.identity_public_key == stranger.public_key  # tests: no storage creds


async def test_dialing_a_stranger_as_our_device_fails_and_shows_it_nothing() -> None:
    network = MemoryNetwork()
    me, stranger = TestIdentity.generate(), TestIdentity.generate()
    async with (
        running(network, "mem://stranger", stranger.new_device()) as theirs,
        running(network, "mem://me", me.new_device()) as ours,
    ):
        with trio.fail_after(30):
            result = await call(ours.address, Dial, "mem://stranger", me.public_key, None)
        assert isinstance(result, Err)
        assert "different identity" in result.reason
        assert me.public_key.hex()[:16] not in result.reason
        assert await _peers(theirs) == ()


async def test_storage_mode_dials_expect_the_storage_key() -> None:
    network = MemoryNetwork()
    storage = new_storage_credentials()
    holder = TestIdentity.generate().new_device(storage=storage)
    async with (
        running(network, "mem://holder", holder),
        running(network, "mem://client", TestIdentity.generate().new_device()) as client,
    ):
        key = storage.certificate.identity_public_key
        with trio.fail_after(30):
            result = await call(client.address, Dial, "mem://holder", key, None)
        assert isinstance(result, Ok), result
        assert result.value.peer.identity_public_key == key


async def _turn_away(stream: MessageStream, modes: list[int], code: int, reason: str) -> None:
    """A listener that reads the handshake's first frame and closes: a full node, a reset."""
    with contextlib.suppress(WireError):
        first = await stream.receive_message()
        modes.append(first[0] & 0x0F)  # the mode bits (the high bits are the cipher suite)
        await stream.aclose(code, reason)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (CloseCode.GOING_AWAY, "too many handshakes in progress"),
        (CloseCode.PROTOCOL_ERROR, "connection reset"),
        (CloseCode.TIMEOUT, "handshake did not finish within 10s"),
    ],
)
async def test_a_bootstrap_dial_falls_back_to_storage_only_when_device_mode_is_refused(
    code: int, reason: str
) -> None:
    """Any failure but the responder's explicit refusal is a failed dial, retried later in
    device mode: one of our own devices that was busy must not become a storage peer."""
    network = MemoryNetwork()
    modes: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(
            network.listen, "mem://busy", lambda s: _turn_away(s, modes, code, reason)
        )
        async with running(network, "mem://laptop", TestIdentity.generate().new_device()) as a:
            with trio.fail_after(30):
                result = await call(a.address, Dial, "mem://busy", None, None)
        nursery.cancel_scope.cancel()
    assert isinstance(result, Err), result
    assert result.code == "dial_failed"
    assert modes == [Mode.DEVICE.value]  # no second, storage-mode handshake


async def test_the_device_refusal_is_a_close_code_that_names_no_identity() -> None:
    network = MemoryNetwork()
    me, stranger = TestIdentity.generate(), TestIdentity.generate()
    async with running(network, "mem://stranger", stranger.new_device()):
        with trio.fail_after(30):
            async with network.dial("mem://stranger") as stream:
                with pytest.raises(ConnectionClosed) as refused:
                    await secure_connection(
                        stream, me.new_device(), initiator=True, mode=Mode.DEVICE
                    )
    assert refused.value.code == CloseCode.DEVICE_REFUSED
    for key in (me.public_key, stranger.public_key):
        assert key.hex()[:8] not in refused.value.reason


# -- issue 17: cipher suites. A node takes AES-GCM only where its CPU is fast at it --


FAST = (Suite.AESGCM, Suite.CHACHAPOLY)
SLOW = (Suite.CHACHAPOLY,)


@pytest.mark.parametrize(
    ("dialer", "listener", "expected"),
    [(FAST, FAST, Suite.AESGCM), (FAST, SLOW, Suite.CHACHAPOLY), (SLOW, FAST, Suite.CHACHAPOLY)],
)
@pytest.mark.parametrize("ours", [True, False], ids=["own device", "storage peer"])
async def test_aes_gcm_runs_only_where_both_ends_take_it(
    dialer: tuple[Suite, ...], listener: tuple[Suite, ...], expected: Suite, ours: bool
) -> None:
    """A dial to a node without fast AES is refused at message 1 (close code 4002) and made
    again in ChaChaPoly, in the same mode: the user's own devices still meet as devices."""
    network = MemoryNetwork()
    me = TestIdentity.generate()
    other = me if ours else TestIdentity.generate()
    async with (
        running(network, "mem://pi", other.new_device(), listener),
        running(network, "mem://laptop", me.new_device(), dialer) as laptop,
    ):
        with trio.fail_after(30):
            result = await call(laptop.address, Dial, "mem://pi", None, None)
        assert isinstance(result, Ok), result
        assert result.value.suite is expected
        assert result.value.is_device is ours


def test_a_node_cannot_leave_out_the_suite_every_node_takes() -> None:
    send, _ = trio.open_memory_channel[TransportEvent](1)
    with pytest.raises(ValueError, match="ChaChaPoly"):
        TransportActor(
            MemoryNetwork(), TestIdentity.generate().new_device(), send, suites=(Suite.AESGCM,)
        )
