"""Whether a connection is one of our devices is decided once, by the handshake mode the
transport used (`PeerInfo.is_device`), not by the identity a certificate names (review of
issue 20 item 3): peering tells gossip, the router, reputation and the shard keeper so."""

from __future__ import annotations

import itertools
import os

import trio
import trio.testing

from actors import _dial_schedule as ds
from actors import discovery as dc
from actors import gossip as gs
from actors import peering as pr
from actors import router as qr
from actors import shard_keeper as sk
from actors import transport as tp
from actors.runtime import Mailbox, Ok, call
from tests._peering import peering_under_test
from wire import PeerIdentity
from wire.testing import TestIdentity

OURS = TestIdentity.generate().public_key


def _drain(mailbox: Mailbox[object]) -> list[object]:
    got: list[object] = []
    while True:
        try:
            got.append(mailbox.receive.receive_nowait())
        except trio.WouldBlock:
            return got


async def _told(is_device: bool) -> tuple[tp.PeerInfo, pr.PeeringStatus, dict[str, list[object]]]:
    """Report one outbound connection naming OUR identity to peering; what it told whom."""
    peer = PeerIdentity(OURS, os.urandom(16), os.urandom(32))
    info = tp.PeerInfo(peer, "mem://x", tp.Direction.OUTBOUND, trio.current_time(), is_device)
    boxes: dict[str, Mailbox[object]] = {
        name: Mailbox(name, 16) for name in ("transport", "gossip", "keeper", "router")
    }
    events_send, events = trio.open_memory_channel[tp.TransportEvent](4)
    found_send, found = trio.open_memory_channel[dc.PeerFound](8)
    peering = pr.Peering(
        identity=OURS,
        device_id=os.urandom(16),
        transport=boxes["transport"].address,  # type: ignore[arg-type]  # inboxes read here
        gossip=boxes["gossip"].address,  # type: ignore[arg-type]
        keeper=boxes["keeper"].address,  # type: ignore[arg-type]
        router=boxes["router"].address,  # type: ignore[arg-type]
        events=events,
        found=found,
        bootstrap=(),
        redial_interval=5.0,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(peering.run)
        await events_send.send(tp.PeerUp(info))
        with trio.fail_after(10):
            while True:
                state = await call(peering.mailbox.address, pr.PeeringState)
                if isinstance(state, Ok) and state.value.connected:
                    break
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked(0.05)
        told = {name: _drain(box) for name, box in boxes.items()}
        nursery.cancel_scope.cancel()
    found_send.close()
    assert isinstance(state, Ok)
    return info, state.value, told


async def test_a_storage_mode_peer_naming_our_identity_is_no_device() -> None:
    info, state, told = await _told(is_device=False)
    (up,) = told["gossip"]
    assert isinstance(up, gs.PeerUp) and not up.is_device
    assert up.peer_id != info.peer.device_id.hex()  # prefixed: cannot take a device's session
    assert told["router"] == []  # no query session: query text stays with our devices
    assert any(isinstance(m, sk.StoragePeerUp) for m in told["keeper"])  # a storage peer
    (row,) = state.connected
    assert not row.is_device


async def test_a_device_mode_connection_is_our_device() -> None:
    info, state, told = await _told(is_device=True)
    (up,) = told["gossip"]
    assert isinstance(up, gs.PeerUp) and up.is_device
    assert up.peer_id == info.peer.device_id.hex()
    assert [type(m) for m in told["router"]] == [qr.PeerUp]
    assert told["keeper"] == []
    (row,) = state.connected
    assert row.is_device


async def test_a_bootstrap_peer_connected_only_in_storage_mode_is_probed_in_device_mode(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A bootstrap address that answered in storage mode is asked, inside that session, whether
    it holds our PSK (with backoff while it says no); once it does, it is dialed in device mode,
    and once that connects the storage connection closes. No device-mode dial before."""
    redial = 0.2
    peering, transport, found_send, events_send, _gossip = peering_under_test(
        OURS, redial_interval=redial, bootstrap=("mem://home",), events_buffer=8, gossip_buffer=64
    )
    storage_peer = PeerIdentity(os.urandom(32), os.urandom(16), os.urandom(32))
    device_peer = PeerIdentity(OURS, os.urandom(16), os.urandom(32))
    dials: list[tuple[bytes | None, bytes | None, float]] = []
    asks: list[tuple[PeerIdentity, float]] = []
    closed: list[PeerIdentity] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(peering.run)
        with trio.fail_after(60):
            async for message in transport.receive:
                match message:
                    case tp.Dial():
                        dials.append(
                            (
                                message.expected_identity,
                                message.expected_device_id,
                                trio.current_time(),
                            )
                        )
                        if len(dials) == 1:  # device mode broken once: storage mode
                            info = _connected(storage_peer, is_device=False)
                        else:
                            info = _connected(device_peer, is_device=True)
                        message.reply.ok(info)
                        await events_send.send(tp.PeerUp(info))
                    case tp.AskOwn():
                        asks.append((message.peer, trio.current_time()))
                        message.reply.ok(len(asks) >= 2)  # not ours, then ours
                    case tp.Close():
                        closed.append(message.peer)
                        message.reply.ok(None)
                        break
                    case _:
                        message.reply.err("not in this test", "unsupported")  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()
    found_send.close()
    first, accepted = dials
    (no_peer, said_no), (yes_peer, said_yes) = asks
    assert first[:2] == (None, None)  # whoever a person pointed us at
    assert no_peer == yes_peer == storage_peer  # asked over the storage session
    assert accepted[:2] == (OURS, None)  # device mode only, any device of ours
    wait = ds.DEVICE_PROBE_FIRST * redial
    assert said_no - first[2] >= wait * 0.99  # a while after connecting
    assert said_yes - said_no >= 2 * wait * 0.99  # doubled after a no
    assert said_yes <= accepted[2] <= said_yes + 1  # dialed once it said yes
    assert closed == [storage_peer]


async def test_a_storage_only_address_is_redialed_in_storage_mode_and_not_probed_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An address that refused our device handshake is redialed in storage mode only (no
    device handshake it would refuse again), it is never dialed in device mode while it says
    it is not ours, and reconnecting does not make a probe due."""
    redial = 0.2
    peering, transport, found_send, events_send, _gossip = peering_under_test(
        OURS, redial_interval=redial, bootstrap=("mem://home",), events_buffer=8, gossip_buffer=64
    )
    storage_peer = PeerIdentity(os.urandom(32), os.urandom(16), os.urandom(32))
    asked: list[tuple[str, float]] = []
    lives = 4 * ds.DEVICE_PROBE_FIRST * redial  # stable, and long enough for a probe

    async def up_then_down(info: tp.PeerInfo, lives: float) -> None:
        await events_send.send(tp.PeerUp(info))
        await trio.sleep(lives)
        await events_send.send(tp.PeerDown(info, "link went down"))

    async with trio.open_nursery() as nursery:
        await nursery.start(peering.run)
        with trio.fail_after(600):
            async for message in transport.receive:
                match message:
                    case tp.Dial() | tp.DialStorage():
                        kind = type(message).__name__
                        if isinstance(message, tp.Dial) and message.expected_identity == OURS:
                            kind = "device dial"
                        asked.append((kind, trio.current_time()))
                        info = _connected(storage_peer, is_device=False)
                        message.reply.ok(info)
                        # Up for a while, then down.
                        nursery.start_soon(up_then_down, info, lives)
                    case tp.AskOwn():
                        assert message.peer == storage_peer
                        asked.append(("probe", trio.current_time()))
                        message.reply.ok(False)
                        if kinds_seen(asked) >= {"DialStorage", "probe"} and len(asked) >= 6:
                            break
                    case _:
                        message.reply.err("not in this test", "unsupported")  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()
    found_send.close()
    kinds = [k for k, _ in asked]
    assert kinds[0] == "Dial"  # an unknown address: device mode first, then storage mode
    # Every redial after that is in storage mode; only the probes try device mode.
    assert set(kinds[1:]) == {"DialStorage", "probe"}
    # A connection is dialed again only once it went down (not while its PeerUp is on its
    # way: that dial made a second connection, which replaced the first).
    dialed = [at for kind, at in asked if kind != "probe"]
    assert all(later - earlier >= lives for earlier, later in itertools.pairwise(dialed))
    wait = ds.DEVICE_PROBE_FIRST * redial
    for i, (kind, at) in enumerate(asked):
        if kind == "probe":  # never at the moment it connected: a while after the last one
            connected_at = max(t for k, t in asked[:i] if k != "probe")
            assert at - connected_at >= wait * 0.99


def kinds_seen(asked: list[tuple[str, float]]) -> set[str]:
    return {kind for kind, _ in asked[1:]}


def _connected(peer: PeerIdentity, *, is_device: bool) -> tp.PeerInfo:
    return tp.PeerInfo(peer, "mem://home", tp.Direction.OUTBOUND, trio.current_time(), is_device)


async def test_the_keeper_hears_a_storage_peers_score_once_and_again_only_when_it_changes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Every minute peering folds in the keeper's audit findings and refreshes the scores it
    # gave the keeper: unchanged ones are not sent again (they were 11% of all actor
    # messages in a 40-node sim).
    storage = PeerIdentity(os.urandom(32), os.urandom(16), os.urandom(32))
    info = tp.PeerInfo(storage, "mem://s", tp.Direction.OUTBOUND, trio.current_time(), False)
    keeper: Mailbox[sk.KeeperMsg] = Mailbox("keeper", 16)
    heard: list[float] = []
    prefix = storage.identity_public_key.hex()[:16]
    keeper_scores = {prefix: 100}

    async def answer_keeper() -> None:
        async for message in keeper:
            if isinstance(message, sk.KeeperState):
                message.reply.ok(sk.Durability(3, 6, 0, 0, 0, 0, 0, 0, 1, 0, dict(keeper_scores)))
            elif isinstance(message, sk.PeerReputation):
                heard.append(message.score)

    boxes = {name: Mailbox[object](name, 16) for name in ("transport", "gossip")}
    events_send, events = trio.open_memory_channel[tp.TransportEvent](4)
    found_send, found = trio.open_memory_channel[dc.PeerFound](8)
    peering = pr.Peering(
        identity=OURS,
        device_id=os.urandom(16),
        transport=boxes["transport"].address,  # type: ignore[arg-type]
        gossip=boxes["gossip"].address,  # type: ignore[arg-type]
        keeper=keeper.address,
        events=events,
        found=found,
        bootstrap=(),
        redial_interval=5.0,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_keeper)
        await nursery.start(peering.run)
        await events_send.send(tp.PeerUp(info))
        await trio.sleep(10 * pr.REPUTATION_SAVE_INTERVAL + 1)
        assert len(heard) == 1
        keeper_scores[prefix] = 100 - 3 * sk.PENALTY  # three failed audit items
        await trio.sleep(pr.REPUTATION_SAVE_INTERVAL)
        assert len(heard) == 2 and heard[1] < heard[0]
        await trio.sleep(5 * pr.REPUTATION_SAVE_INTERVAL)
        assert len(heard) == 2
        nursery.cancel_scope.cancel()
    found_send.close()
