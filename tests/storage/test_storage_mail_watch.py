"""Mailbox watches: a storage node tells a watching connection of new entries (``mail.notify``),
and a shard keeper then pulls at once but polls a watching peer for heads only now and then."""

from __future__ import annotations

import os

import trio
import trio.testing
from nacl.signing import SigningKey

from actors import shard_keeper as sk
from actors import storage as sg
from actors.runtime import Ok, Result
from dmgn import storage_protocol as sp
from dmgn.feed import VersionVector
from dmgn.shards import MailKeys, ShardParams
from tests.storage._cluster import cluster
from tests.storage.test_storage_keeper import OWNER, Peers, keeper_for, peer
from tests.storage.test_storage_refusals import client, prove
from wire import Message, PeerIdentity, SecureConnection

STREAM = os.urandom(16)


async def until_reply(connection: SecureConnection, rid: int) -> tuple[Message, list[Message]]:
    """The reply to ``rid``, and every other message that arrived before it."""
    before: list[Message] = []
    with trio.fail_after(20):
        while True:
            message = await connection.receive()
            if message.type == sp.REPLY.name and message["rid"] == rid:
                return message, before
            before.append(message)


async def test_a_push_by_one_device_is_announced_to_the_other_devices_watching() -> None:
    key = SigningKey(os.urandom(32))
    owner = bytes(key.verify_key)
    async with cluster() as nodes:
        holder = await nodes.start("holder", "holder")
        async with (
            client(holder.address, key) as watcher,
            client(holder.address, key) as pusher,
            client(holder.address, key) as bystander,
        ):
            heads = sp.MAIL_HEADS(rid=1, owner=owner, proof=prove(key, watcher), watch=1)
            await watcher.send(heads)
            answer, _ = await until_reply(watcher, 1)
            assert answer["code"] == "" and answer["watch"] == sg.WATCH_SECONDS
            # Heads without ``watch`` (an older keeper, a one-off restore): no watch, no notices.
            await bystander.send(sp.MAIL_HEADS(rid=1, owner=owner, proof=prove(key, bystander)))
            plain, _ = await until_reply(bystander, 1)
            assert plain["code"] == "" and "watch" not in plain.fields
            # The pusher watches too: it is never told of its own pushes.
            await pusher.send(sp.MAIL_HEADS(rid=1, owner=owner, proof=prove(key, pusher), watch=1))
            await until_reply(pusher, 1)

            items = [os.urandom(300) for _ in range(3)]
            push = sp.MAIL_PUSH(
                rid=2, owner=owner, proof=prove(key, pusher), stream=STREAM, first=1, items=items
            )
            await pusher.send(push)
            pushed, _ = await until_reply(pusher, 2)
            assert pushed["code"] == ""
            with trio.fail_after(20):
                notice = await watcher.receive()
            assert notice.type == sp.MAIL_NOTIFY.name
            assert notice["owner"] == owner and notice["stream"] == STREAM and notice["seq"] == 3

            # The same entries again hold nothing new: nobody is told.
            await pusher.send(sp.MAIL_PUSH(**{**push.fields, "rid": 3}))
            await until_reply(pusher, 3)
            for connection in (watcher, pusher, bystander):
                await connection.send(
                    sp.MAIL_HEADS(rid=4, owner=owner, proof=prove(key, connection))
                )
                _, before = await until_reply(connection, 4)
                assert [m.type for m in before] == []


class WatchingPeers(Peers):
    """Storage peers that answer heads (``watch`` for ``watching`` ones) and count the pulls'
    asks (those with ``watch``; the mailbox pusher asks once a connection without it)."""

    def __init__(self, nursery: trio.Nursery, watching: set[bytes]) -> None:
        super().__init__(nursery, liars=set())
        self.watching = watching
        self.asked: dict[bytes, list[float]] = {}

    async def send(self, to: PeerIdentity, message: Message) -> Result[None]:
        fields: dict[str, object] = {"code": "", "reason": ""}
        if message.type == sp.MAIL_HEADS.name:
            fields["streams"], fields["seqs"] = [], []
            if message.fields.get("watch") == 1:
                self.asked.setdefault(to.identity_public_key, []).append(trio.current_time())
                if to.identity_public_key in self.watching:
                    fields["watch"] = 1800
        reply = sp.REPLY(rid=message["rid"], **fields)  # type: ignore[arg-type]
        assert self.keeper is not None
        self.nursery.start_soon(self.keeper.mailbox.address.send, sk.StorageReply(to, reply))
        return Ok(None)


OTHER_DEVICE = os.urandom(16)
MAIL_KEYS = MailKeys(os.urandom(32))
#: Sync rounds every 0.5 s, a watching peer's heads every 4 s.
SETTINGS = sk.KeeperSettings(
    ShardParams(3, 6),
    repair_interval=3600,
    request_timeout=5,
    sync_interval=0.5,
    mail_poll_interval=4.0,
)


async def test_a_watching_peer_is_polled_rarely_and_its_notice_makes_the_keeper_ask_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Virtual time: each "nothing more was asked" below is checked after the keeper has had all
    # of that time to ask, not after a real-clock wait it might merely have overrun.
    watcher, plain = peer(1), peer(2)
    other_stream = MAIL_KEYS.stream_id(OTHER_DEVICE)
    have = {OTHER_DEVICE: 0}

    async def vector() -> Result[VersionVector]:
        return Ok(VersionVector(have))

    async with trio.open_nursery() as nursery:
        peers = WatchingPeers(nursery, {watcher.identity_public_key})
        keeper = keeper_for(peers, {}, vector=vector, settings=SETTINGS, mail_keys=MAIL_KEYS)
        await nursery.start(keeper.run)
        for storage_peer in (watcher, plain):
            await keeper.mailbox.address.send(sk.StoragePeerUp(storage_peer))
        await trio.sleep(3.0)
        # Both asked once they connected; then the plain one every sync round (0.5 s), the
        # watching one not again before its poll (4 s).
        assert len(peers.asked[watcher.identity_public_key]) == 1
        assert len(peers.asked[plain.identity_public_key]) >= 4

        # A notice of entries gossip already brought: nothing to ask.
        have[OTHER_DEVICE] = 5
        notice = sp.MAIL_NOTIFY(owner=OWNER, stream=other_stream, seq=5)
        await keeper.mailbox.address.send(sk.MailNotice(watcher, notice))
        await trio.sleep(0.6)
        assert len(peers.asked[watcher.identity_public_key]) == 1
        # A notice of entries we lack: the keeper asks that peer at once.
        noticed_at = trio.current_time()
        notice = sp.MAIL_NOTIFY(owner=OWNER, stream=other_stream, seq=6)
        await keeper.mailbox.address.send(sk.MailNotice(watcher, notice))
        await trio.sleep(1.0)
        assert len(peers.asked[watcher.identity_public_key]) == 2
        assert peers.asked[watcher.identity_public_key][-1] - noticed_at < 1.0
        # A notice about another owner's mailbox is ignored.
        stray = sp.MAIL_NOTIFY(owner=os.urandom(32), stream=other_stream, seq=9)
        await keeper.mailbox.address.send(sk.MailNotice(watcher, stray))
        await trio.sleep(0.6)
        assert len(peers.asked[watcher.identity_public_key]) == 2
        nursery.cancel_scope.cancel()
