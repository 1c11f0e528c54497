"""The shard keeper against scripted storage peers: placement rules, audits, scoring."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable

import trio

from actors import shard_keeper as sk
from actors.runtime import Ok, Result, call, expect
from dmgn import storage_protocol as sp
from dmgn.feed import FeedEntry, VersionVector
from dmgn.shards import MailKeys, ShardKeys, ShardParams
from tests._harness import eventually
from wire import Message, PeerIdentity

OWNER = os.urandom(32)


def peer(n: int) -> PeerIdentity:
    identity = hashlib.sha256(b"storage peer %d" % n).digest()
    return PeerIdentity(identity, bytes([n]) * 16, os.urandom(32))


class Peers:
    """Storage peers that answer from dicts; ``liars`` answer audits with garbage."""

    def __init__(self, nursery: trio.Nursery, liars: set[bytes]) -> None:
        self.nursery = nursery
        self.liars = liars
        self.held: dict[bytes, dict[bytes, bytes]] = {}
        self.closed: list[tuple[bytes, str]] = []
        self.keeper: sk.ShardKeeper | None = None

    async def send(self, to: PeerIdentity, message: Message) -> Result[None]:
        held = self.held.setdefault(to.identity_public_key, {})
        fields: dict[str, object] = {"code": "", "reason": ""}
        if message.type == sp.PUT.name:
            held.update(zip(message["oids"], message["blobs"], strict=True))  # type: ignore[arg-type]
            fields["used"] = sum(len(b) for b in held.values())
        elif message.type == sp.AUDIT.name:
            nonce = message.get_bytes("nonce")
            oids = [o for o in message["oids"] if o in held]  # type: ignore[union-attr]
            fields["oids"] = oids
            lie = to.identity_public_key in self.liars
            fields["proofs"] = [
                os.urandom(32) if lie else hashlib.sha256(nonce + held[o]).digest() for o in oids
            ]
        elif message.type == sp.MAIL_HEADS.name:
            fields["streams"], fields["seqs"] = [], []
        reply = sp.REPLY(rid=message["rid"], **fields)  # type: ignore[arg-type]
        assert self.keeper is not None
        self.nursery.start_soon(self.keeper.mailbox.address.send, sk.StorageReply(to, reply))
        return Ok(None)

    async def close(self, to: PeerIdentity, reason: str) -> None:
        self.closed.append((to.identity_public_key, reason))


def keeper_for(
    peers: Peers,
    envelopes: dict[str, bytes],
    *,
    vector: Callable[[], Awaitable[Result[VersionVector]]] | None = None,
    settings: sk.KeeperSettings | None = None,
    mail_keys: MailKeys | None = None,
) -> sk.ShardKeeper:
    async def get(ids: tuple[str, ...]) -> Result[dict[str, bytes]]:
        return Ok({i: envelopes[i] for i in ids if i in envelopes})

    async def inventory() -> Result[tuple[frozenset[str], frozenset[str]]]:
        return Ok((frozenset(envelopes), frozenset()))

    async def ingest(entries: tuple[FeedEntry, ...]) -> Result[int]:
        return Ok(0)

    async def no_vector() -> Result[VersionVector]:
        return Ok(VersionVector())

    async def sign(context: bytes, data: bytes) -> Result[bytes]:
        return Ok(bytes(64))

    keeper = sk.ShardKeeper(
        None,
        owner=OWNER,
        device_id=os.urandom(16),
        shard_keys=ShardKeys(os.urandom(32)),
        mail_keys=mail_keys or MailKeys(os.urandom(32)),
        send=peers.send,
        sign=sign,
        envelopes=get,
        inventory=inventory,
        ingest=ingest,
        vector=vector or no_vector,
        close=peers.close,
        settings=settings
        or sk.KeeperSettings(ShardParams(3, 6), repair_interval=3600, request_timeout=5),
    )
    peers.keeper = keeper
    return keeper


async def test_shards_spread_one_per_peer_and_a_peer_failing_audits_is_cut_off() -> None:
    envelopes = {hashlib.sha256(e).hexdigest(): e for e in (os.urandom(700) for _ in range(10))}
    liar = peer(3)
    async with trio.open_nursery() as nursery:
        peers = Peers(nursery, {liar.identity_public_key})
        keeper = keeper_for(peers, envelopes)
        await nursery.start(keeper.run)
        for n in range(7):
            await keeper.mailbox.address.send(sk.StoragePeerUp(peer(n)))
        await keeper.mailbox.address.send(sk.Disperse(tuple(envelopes)))

        async def placed() -> bool:
            d = await expect(await call(keeper.mailbox.address, sk.KeeperState))
            return d.complete == 10

        await eventually(placed)
        # Never two shards of one memory on one peer: 6 shards on 6 distinct peers each.
        per_peer = [len(held) for held in peers.held.values()]
        assert sum(per_peer) == 60 and max(per_peer) <= 10 and len(per_peer) >= 6
        liar_held = len(peers.held.get(liar.identity_public_key, {}))
        for _ in range(5):
            report = await expect(await call(keeper.mailbox.address, sk.AuditNow))
        assert report.failed == 0  # its placements were dropped by the first failed rounds
        state = await expect(await call(keeper.mailbox.address, sk.KeeperState))
        assert state.peer_scores[liar.identity_public_key.hex()[:16]] <= sk.AVOID_SCORE
        assert [who for who, _ in peers.closed] == [liar.identity_public_key]
        assert "cut off" in peers.closed[0][1]
        # Its shards were placed elsewhere, and nothing new goes to it.
        repaired = await expect(await call(keeper.mailbox.address, sk.RepairNow))
        assert repaired == liar_held
        state = await expect(await call(keeper.mailbox.address, sk.KeeperState))
        assert state.complete == 10
        nursery.cancel_scope.cancel()
