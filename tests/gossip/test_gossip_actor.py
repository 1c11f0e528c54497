"""The gossip actor, as specifications: devices converge; bad peers are cut off.

Each node here is a real vault (real identity keys), a gossip actor, and a small in-memory
"service" that applies ApplyOps the way the memory service must (verify the envelope, deletes win,
idempotent). Nodes are connected by memory channels through the real schema registry (so every
message is encoded, size-checked and decoded as on the wire).
"""

from __future__ import annotations

import os
import sys

# tests/ is on sys.path (pytest prepend mode) and tests/wire/ would shadow the `wire` package as
# an empty namespace package; put the repository first (the fix belongs in pytest's pythonpath).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
if getattr(sys.modules.get("wire"), "__file__", "") is None:
    del sys.modules["wire"]
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing
from nacl.signing import SigningKey

from actors import gossip as gs
from actors.runtime import ActorGone, Address, Err, Mailbox, Ok, Result, call
from actors.vault import Seal, Sign, SignFeed, VaultActor
from dmgn.feed import (
    FEED_ENTRY_CONTEXT,
    MAX_ENTRY_BYTES,
    AddMemory,
    Delete,
    FeedEntry,
    FeedHead,
    Link,
    Op,
    Unlink,
    UnsignedEntry,
    VersionVector,
)
from dmgn.memory import Memory, read_header
from tests._harness import eventually
from wire import (
    DeviceCredentials,
    MemoryNetwork,
    Message,
    MessageStream,
    SecureConnection,
    WireError,
    secure_connection,
)
from wire.testing import TestIdentity

SEED = bytes(range(32))
STRANGER_SEED = bytes(range(1, 33))


# -- a node -------------------------------------------------------------------------------------


@dataclass
class AppliedState:
    """What a node's store holds: the thing that must converge."""

    memories: dict[str, bytes] = field(default_factory=dict)
    links: dict[tuple[str, str, str], float] = field(default_factory=dict)
    tombstones: set[str] = field(default_factory=set)
    applied_ops: int = 0
    fail_next: int = 0

    def snapshot(self) -> tuple[frozenset[str], dict[tuple[str, str, str], float], frozenset[str]]:
        return frozenset(self.memories), dict(self.links), frozenset(self.tombstones)

    def apply(self, op: Op) -> bool:
        match op:
            case AddMemory():
                memory_id = read_header(op.envelope).id
                if memory_id in self.tombstones or memory_id in self.memories:
                    return False
                self.memories[memory_id] = op.envelope
            case Link():
                if op.from_id in self.tombstones or op.to_id in self.tombstones:
                    return False
                self.links[(op.from_id, op.to_id, op.edge_type)] = op.weight
            case Unlink():
                return self.links.pop((op.from_id, op.to_id, op.edge_type), None) is not None
            case Delete():
                self.tombstones.add(op.memory_id)
                self.memories.pop(op.memory_id, None)
                for key in [k for k in self.links if op.memory_id in k[:2]]:
                    del self.links[key]
        return True


class ApplyService:
    """Stands in for the memory service's ApplyOps handler."""

    def __init__(self, state: AppliedState) -> None:
        self.mailbox: Mailbox[gs.ApplyMsg] = Mailbox("apply", 64)
        self.state = state

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for message in self.mailbox:
            if self.state.fail_next:
                self.state.fail_next -= 1
                message.reply.err("the memory store failed: disk full", "store_error")
                continue
            changed = sum(self.state.apply(entry.op) for entry in message.entries)
            self.state.applied_ops += len(message.entries)
            message.reply.ok(changed)


class Node:
    def __init__(
        self,
        name: str,
        *,
        seed: bytes = SEED,
        log: gs.FeedLog | None = None,
        sync_interval: float = 60.0,
        sign_feed: bool = False,
    ) -> None:
        self.name = name
        self.sign_feed = sign_feed
        self.seed = seed
        self.device_id = os.urandom(16)
        self.log = log or gs.FeedLog(None)
        self.state = AppliedState()
        self.sync_interval = sync_interval
        self.cut_offs: list[tuple[str, str]] = []
        self.vault = VaultActor(seed, self.device_id)
        self._scope: trio.CancelScope | None = None
        self.gossip: gs.GossipActor

    @property
    def identity(self) -> bytes:
        return bytes(SigningKey(self.seed).verify_key)

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._run)

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.vault = VaultActor(self.seed, self.device_id)
        vault = self.vault.mailbox.address

        async def sign(context: bytes, data: bytes) -> Result[bytes]:
            return await call(vault, Sign, context, data)

        async def cut_off(peer_id: str, reason: str) -> None:
            self.cut_offs.append((peer_id, reason))

        async def sign_feed(
            head: FeedHead | None, device: bytes, items: tuple[tuple[int, Op], ...]
        ) -> Result[list[FeedEntry | Err]]:
            return await call(vault, SignFeed, head, device, items)

        apply = ApplyService(self.state)
        self.gossip = gs.GossipActor(
            identity=self.identity,
            device_id=self.device_id,
            sign=sign,
            apply=apply.mailbox.address,
            log=self.log,
            sync_interval=self.sync_interval,
            cut_off=cut_off,
            sign_feed=sign_feed if self.sign_feed else None,
        )
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.vault.run)
                await nursery.start(apply.run)
                await nursery.start(self.gossip.run)
                task_status.started()

    def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()

    @property
    def address(self) -> Address[gs.GossipMsg]:
        return self.gossip.mailbox.address

    # Local use cases, as the memory service runs them: change the store, then Publish.

    async def publish(self, op: Op) -> FeedEntry:
        self.state.apply(op)
        result = await call(self.address, gs.Publish, op)
        assert isinstance(result, Ok), result
        return result.value

    async def add(self, text: str) -> str:
        sealed = await call(self.vault.mailbox.address, Seal, Memory(text, "text", 1))
        assert isinstance(sealed, Ok)
        memory_id, envelope = sealed.value
        await self.publish(AddMemory(envelope))
        return memory_id

    async def status(self) -> gs.GossipStatus:
        result = await call(self.address, gs.SyncState)
        assert isinstance(result, Ok)
        return result.value


# -- the network --------------------------------------------------------------------------------


@dataclass
class Wire:
    """Counts what crosses the links (encoded bytes per message type)."""

    bytes_by_type: dict[str, int] = field(default_factory=dict)
    messages: int = 0


class Connection:
    def __init__(self, a: Node, b: Node, wire: Wire) -> None:
        self.a, self.b, self.wire = a, b, wire
        self.scope = trio.CancelScope()

    async def open(self, nursery: trio.Nursery) -> None:
        a_send, a_receive = trio.open_memory_channel[Message](16)
        b_send, b_receive = trio.open_memory_channel[Message](16)
        nursery.start_soon(self._run, a_receive, b_receive)
        await self.a.address.send(gs.PeerUp(self.b.name, self.b.identity, True, a_send))
        await self.b.address.send(gs.PeerUp(self.a.name, self.a.identity, True, b_send))

    async def _run(
        self,
        a_receive: trio.MemoryReceiveChannel[Message],
        b_receive: trio.MemoryReceiveChannel[Message],
    ) -> None:
        with self.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward, a_receive, self.a, self.b)
                nursery.start_soon(self._forward, b_receive, self.b, self.a)
        # The connection is closed (by the test, or because one side is done with the peer).
        with trio.CancelScope(shield=True):
            for node, other in ((self.a, self.b), (self.b, self.a)):
                try:
                    with trio.move_on_after(1):
                        await node.address.send(gs.PeerDown(other.name))
                except ActorGone:
                    pass

    async def _forward(
        self, receive: trio.MemoryReceiveChannel[Message], source: Node, target: Node
    ) -> None:
        async for message in receive:
            data = gs.GOSSIP_REGISTRY.encode(message)
            self.wire.messages += 1
            self.wire.bytes_by_type[message.type] = self.wire.bytes_by_type.get(
                message.type, 0
            ) + len(data)
            await target.address.send(gs.Inbound(source.name, gs.GOSSIP_REGISTRY.decode(data)))
        self.scope.cancel()

    def close(self) -> None:
        self.scope.cancel()


async def connect(nursery: trio.Nursery, a: Node, b: Node, wire: Wire | None = None) -> Connection:
    connection = Connection(a, b, wire or Wire())
    await connection.open(nursery)
    return connection


def same(*nodes: Node) -> bool:
    first = nodes[0].state.snapshot()
    return all(node.state.snapshot() == first for node in nodes[1:])


async def vectors_equal(*nodes: Node) -> bool:
    vectors = [(await node.status()).vector for node in nodes]
    return all(v == vectors[0] for v in vectors)


# -- convergence --------------------------------------------------------------------------------


async def test_adds_links_and_deletes_on_each_side_converge(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = Node("a"), Node("b")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        await connect(nursery, a, b)
        m1 = await a.add("laptop memory")
        m2 = await b.add("desktop memory")
        m3 = await a.add("to be deleted")
        await b.publish(Link(m2, m1, "related", 0.5))
        await eventually(lambda: m3 in b.state.memories)
        await b.publish(Delete(m3))
        await eventually(lambda: same(a, b) and m3 in a.state.tombstones)
        assert set(a.state.memories) == {m1, m2}
        assert a.state.links == {(m2, m1, "related"): 0.5}
        await eventually(lambda: vectors_equal(a, b))
        nursery.cancel_scope.cancel()


async def test_three_devices_converge_through_a_device_in_the_middle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b, c = Node("a"), Node("b"), Node("c")
    async with trio.open_nursery() as nursery:
        for node in (a, b, c):
            await node.start(nursery)
        await connect(nursery, a, b)
        await connect(nursery, b, c)  # a and c never meet
        ids = [await a.add(f"a{i}") for i in range(5)] + [await c.add(f"c{i}") for i in range(5)]
        await c.publish(Link(ids[0], ids[9], "cites", 1.0))
        await a.publish(Delete(ids[1]))
        await eventually(lambda: same(a, b, c) and len(a.state.memories) == 9)
        assert a.state.links == {(ids[0], ids[9], "cites"): 1.0}
        await eventually(lambda: vectors_equal(a, b, c))
        nursery.cancel_scope.cancel()


async def test_stopped_device_catches_up_after_restart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = Node("a"), Node("b")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        link = await connect(nursery, a, b)
        first = await a.add("before the partition")
        await eventually(lambda: same(a, b) and first in b.state.memories)
        link.close()
        b.stop()
        # Changes on both sides while apart: b's own log and store persist (same objects).
        during = [await a.add(f"while b was down {i}") for i in range(20)]
        await a.publish(Delete(first))
        await b.start(nursery)
        offline = await b.add("made on b while apart")
        await connect(nursery, a, b)
        await eventually(lambda: same(a, b))
        assert set(b.state.memories) == {*during, offline}
        assert first in b.state.tombstones
        nursery.cancel_scope.cancel()


async def test_concurrent_adds_on_both_sides_during_catch_up_lose_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = Node("a"), Node("b")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        # A backlog bigger than one want (MAX_WANT_ENTRIES) and many batches.
        backlog = [Delete(os.urandom(32).hex()) for _ in range(gs.MAX_WANT_ENTRIES + 700)]
        for op in backlog:
            await a.publish(op)
        await connect(nursery, a, b)
        added: list[str] = []

        async def keep_adding(node: Node, prefix: str) -> None:
            for i in range(40):
                added.append(await node.add(f"{prefix} {i}"))
                await trio.sleep(0.001)

        async with trio.open_nursery() as writers:
            writers.start_soon(keep_adding, a, "a")
            writers.start_soon(keep_adding, b, "b")
        await eventually(lambda: same(a, b))
        assert set(a.state.memories) == set(added) and len(added) == 80
        assert len(b.state.tombstones) == len(backlog)
        await eventually(lambda: vectors_equal(a, b))
        nursery.cancel_scope.cancel()


async def test_delete_wins_over_a_concurrent_link_and_a_re_add(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = Node("a"), Node("b")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        link = await connect(nursery, a, b)
        m1, m2 = await a.add("one"), await a.add("two")
        await eventually(lambda: same(a, b) and len(b.state.memories) == 2)
        link.close()
        envelope = a.state.memories[m1]
        await a.publish(Delete(m1))
        await b.publish(Link(m2, m1, "related", 1.0))  # b has not heard of the delete
        await connect(nursery, a, b)
        await eventually(lambda: same(a, b) and m1 in b.state.tombstones)
        assert a.state.links == {} and set(a.state.memories) == {m2}
        # A later add of the same memory (same envelope, same id) stays deleted everywhere.
        await b.publish(AddMemory(envelope))
        await eventually(lambda: vectors_equal(a, b))
        assert m1 not in a.state.memories
        nursery.cancel_scope.cancel()


async def test_concurrent_link_and_unlink_resolve_to_the_later_one_everywhere(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = Node("a"), Node("b")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        link = await connect(nursery, a, b)
        m1, m2 = await a.add("one"), await a.add("two")
        await a.publish(Link(m1, m2, "related", 1.0))
        await eventually(lambda: same(a, b) and len(b.state.links) == 1)
        link.close()
        await a.publish(Unlink(m1, m2, "related"))
        await trio.sleep(1)  # b's change is later in (virtual) wall time
        b.gossip._wall_clock = lambda: 2**62  # and clearly so, whatever the clock says
        await b.publish(Link(m1, m2, "related", 3.0))
        await connect(nursery, a, b)
        await eventually(lambda: vectors_equal(a, b))
        await eventually(lambda: same(a, b))
        assert a.state.links == {(m1, m2, "related"): 3.0}
        nursery.cancel_scope.cancel()


async def test_failed_apply_is_retried_and_nothing_is_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = Node("a"), Node("b")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        b.state.fail_next = 1
        await connect(nursery, a, b)
        memory_id = await a.add("survives a store hiccup")
        await eventually(lambda: memory_id in b.state.memories, deadline=gs.WANT_TIMEOUT * 3)
        status = await b.status()
        assert status.last_apply_error == "the memory store failed: disk full"
        nursery.cancel_scope.cancel()


async def test_sync_state_reports_vectors_and_lag(autojump_clock: trio.testing.MockClock) -> None:
    a, b = Node("a"), Node("b")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        for i in range(3):
            await a.add(f"m{i}")
        await connect(nursery, a, b)
        await eventually(lambda: len(b.state.memories) == 3)
        status = await a.status()
        assert status.vector == VersionVector({a.device_id: 3})
        assert status.entries == 3
        (peer,) = status.peers
        assert peer.peer_id == "b" and peer.connected and peer.is_device
        assert peer.last_sync_at is not None
        await eventually(lambda: _in_sync(a))
        assert (await b.status()).peers[0].bytes_in > 0
        assert await call(a.address, gs.SyncNow) == Ok(1)
        nursery.cancel_scope.cancel()


async def _in_sync(node: Node) -> bool:
    peer = (await node.status()).peers[0]
    return peer.behind_us == 0 and peer.ahead_of_us == 0


# -- durability ---------------------------------------------------------------------------------


async def test_feed_log_file_survives_restart_and_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "gossip" / "feeds.log"
    a = Node("a", log=gs.FeedLog(path))
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        ids = [await a.add(f"durable {i}") for i in range(5)]
        a.stop()
    size = path.stat().st_size
    with path.open("ab") as file:
        file.write(b"\x00\x00\x10\x00garbage")  # a record cut short by a crash
    a.log = gs.FeedLog(path)
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        assert path.stat().st_size == size
        status = await a.status()
        assert status.vector == VersionVector({a.device_id: 5})
        # Publishing continues the same feed.
        entry = await a.publish(Delete(ids[0]))
        assert entry.seq == 6
        a.stop()
    assert path.stat().st_mode & 0o777 == 0o600


class CountingLog(gs.FeedLog):
    """An in-memory feed log that counts appends (each is one disk sync on a real log)."""

    def __init__(self) -> None:
        super().__init__(None)
        self.appends = 0

    def append(self, entries: Sequence[FeedEntry]) -> list[int]:
        self.appends += 1
        return super().append(entries)


@pytest.mark.parametrize("chain", [False, True], ids=["sign-each", "vault-signs-the-chain"])
async def test_publish_many_logs_a_bulk_add_in_order_with_one_sync_and_it_syncs(
    chain: bool,
) -> None:
    # A real clock: the vault signs a big group in a worker thread, which a mock clock that
    # jumps whenever every task waits would outrun.
    log = CountingLog()
    a, b = Node("a", log=log, sign_feed=chain), Node("b")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        await connect(nursery, a, b)
        ids, ops = [], []
        for i in range(gs.PUBLISH_GROUP_MAX):
            sealed = await call(a.vault.mailbox.address, Seal, Memory(f"bulk {i}", "text", i + 1))
            assert isinstance(sealed, Ok)
            ids.append(sealed.value[0])
            ops.append(AddMemory(sealed.value[1]))
            a.state.apply(ops[-1])
        before = log.appends
        result = await call(a.address, gs.PublishMany, tuple(ops))
        assert isinstance(result, Ok), result
        assert log.appends == before + 1
        assert [e.seq for e in result.value] == list(range(1, len(ops) + 1))
        assert [e.op for e in result.value] == ops
        for entry in result.value:  # every entry is a valid one of our feed, not only the first
            entry.verify(a.identity)
        await eventually(lambda: set(b.state.memories) == set(ids))
        # An op too big to be an entry is refused alone; the others take the next seqs.
        huge = Link("ab" * 32, "cd" * 32, "x" * MAX_ENTRY_BYTES, 1.0)
        mixed = await call(a.address, gs.PublishMany, (Delete(ids[0]), huge, Delete(ids[1])))
        assert isinstance(mixed, Err) and "1 of 3 ops not logged" in mixed.reason
        assert (await a.status()).vector == VersionVector({a.device_id: len(ops) + 2})
        ops += [Delete(ids[0]), Delete(ids[1])]
        # Too many at once is refused whole, and nothing is logged.
        too_many = tuple(Delete(f"{i:064x}") for i in range(gs.PUBLISH_GROUP_MAX + 1))
        refused = await call(a.address, gs.PublishMany, too_many)
        assert isinstance(refused, Err) and "at most" in refused.reason
        assert (await a.status()).vector == VersionVector({a.device_id: len(ops)})
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("chain", [False, True], ids=["sign-each", "vault-signs-the-chain"])
async def test_a_vault_signing_with_another_identity_is_refused_for_every_op(chain: bool) -> None:
    # A real clock: the vault signs a big group in a worker thread, which a mock clock that
    # jumps whenever every task waits would outrun.
    a = Node("a", sign_feed=chain)
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        a.gossip._identity = bytes(SigningKey(STRANGER_SEED).verify_key)  # a misconfigured node
        refused = await call(a.address, gs.PublishMany, (Delete("ab" * 32), Delete("cd" * 32)))
        assert isinstance(refused, Err) and "another identity" in refused.reason
        single = await call(a.address, gs.Publish, Delete("ef" * 32))
        assert isinstance(single, Err) and "another identity" in single.reason
        assert (await a.status()).vector == VersionVector({})
        nursery.cancel_scope.cancel()


# -- bad peers ----------------------------------------------------------------------------------


class RawPeer:
    """A peer driven by the test: it sends whatever it likes and sees what it gets."""

    def __init__(
        self,
        node: Node,
        peer_id: str = "mallory",
        *,
        identity: bytes | None = None,
        is_device: bool = True,
    ) -> None:
        self.node, self.peer_id = node, peer_id
        self.identity = node.identity if identity is None else identity
        self.is_device = is_device
        self.send, self.receive = trio.open_memory_channel[Message](512)

    async def up(self) -> None:
        await self.node.address.send(
            gs.PeerUp(self.peer_id, self.identity, self.is_device, self.send)
        )

    async def say(self, message: Message) -> None:
        # Through the registry, as the transport would deliver it.
        decoded = gs.GOSSIP_REGISTRY.decode(gs.GOSSIP_REGISTRY.encode(message))
        await self.node.address.send(gs.Inbound(self.peer_id, decoded))

    async def ops(self, *entries: FeedEntry | bytes) -> None:
        await self.say(gs.OPS(entries=[e if isinstance(e, bytes) else e.encoded for e in entries]))

    async def cut_off_reason(self) -> str:
        """Drain until the node closes our channel; the reason it logged."""
        with trio.fail_after(30):
            async for _ in self.receive:
                pass
        assert self.node.cut_offs and self.node.cut_offs[-1][0] == self.peer_id
        return self.node.cut_offs[-1][1]


def entries_signed_by(seed: bytes, ops: list[Op], device: bytes | None = None) -> list[FeedEntry]:
    key = SigningKey(seed)
    device = device or os.urandom(16)
    out: list[FeedEntry] = []
    for i, op in enumerate(ops):
        unsigned = UnsignedEntry.after(out[-1] if out else None, device, 1000 + i, op)
        out.append(
            unsigned.signed(key.sign(FEED_ENTRY_CONTEXT + unsigned.signing_payload()).signature)
        )
    return out


async def _reputation(node: Node, peer_id: str) -> gs.PeerStatus:
    status = await node.status()
    return next(p for p in status.peers if p.peer_id == peer_id)


@pytest.mark.parametrize(
    "attack",
    [
        "forged",
        "garbage",
        "out_of_order",
        "fork",
        "foreign_envelope",
        "storage_peer",
        "bad_vector",
        "bad_want",
    ],
)
async def test_bad_peer_is_cut_off_with_a_reason_and_nothing_it_sent_is_applied(
    attack: str, autojump_clock: trio.testing.MockClock
) -> None:
    a, honest = Node("a"), Node("honest")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await honest.start(nursery)
        await connect(nursery, a, honest)
        await honest.add("from an honest device")
        await eventually(lambda: len(a.state.memories) == 1)
        before = a.state.snapshot()
        mallory = RawPeer(a, is_device=attack != "storage_peer")
        await mallory.up()
        good = entries_signed_by(SEED, [Delete("ab" * 32), Delete("cd" * 32), Delete("ef" * 32)])
        expected: str
        match attack:
            case "forged":
                forged = entries_signed_by(STRANGER_SEED, [Delete("ab" * 32)])
                await mallory.ops(good[0], forged[0])
                expected = "signature does not verify"
            case "garbage":
                await mallory.ops(b"\x93\x01\x02")
                expected = "entry is not valid msgpack"
            case "out_of_order":
                await mallory.ops(good[0], good[2], good[1])
                expected = "out of order"
            case "fork":
                await mallory.ops(*good)
                other = entries_signed_by(
                    SEED, [Delete("ab" * 32), Delete("99" * 32)], device=good[0].device_id
                )
                await mallory.ops(other[1])
                expected = "conflicts with the one we hold"
            case "foreign_envelope":
                stranger = VaultActor(STRANGER_SEED, os.urandom(16))
                async with trio.open_nursery() as inner:
                    await inner.start(stranger.run)
                    sealed = await call(
                        stranger.mailbox.address, Seal, Memory("not ours", "text", 1)
                    )
                    inner.cancel_scope.cancel()
                assert isinstance(sealed, Ok)
                await mallory.ops(entries_signed_by(SEED, [AddMemory(sealed.value[1])])[0])
                expected = "written by another identity"
            case "storage_peer":
                await mallory.ops(good[0])
                expected = "not one of our devices"
            case "bad_vector":
                await mallory.say(gs.VECTOR(heads={"zz" * 16: 3}, ask=True))
                expected = "hex"
            case "bad_want":
                await mallory.say(gs.WANT(device=bytes(16), first=1, last=gs.MAX_WANT_ENTRIES + 10))
                expected = "bad want range"
        reason = await mallory.cut_off_reason()
        assert expected in reason
        if attack == "fork":
            # The three genuine entries before the fork were fine (and are kept).
            assert len(a.state.tombstones) == 3
        else:
            assert a.state.snapshot() == before
        assert (await _reputation(a, "mallory")).score == -gs.CUT_OFF_PENALTY
        # The honest device is not disturbed.
        later = await honest.add("still syncing")
        await eventually(lambda: later in a.state.memories)
        nursery.cancel_scope.cancel()


async def test_replayed_entries_are_applied_once_and_a_replay_flood_is_cut_off(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Node("a")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        mallory = RawPeer(a)
        await mallory.up()
        entries = entries_signed_by(SEED, [Delete("ab" * 32), Delete("cd" * 32)])
        await mallory.ops(*entries)
        await eventually(lambda: a.state.applied_ops == 2)
        for _ in range(int(gs.WASTE_BURST)):
            await mallory.ops(*entries)
        reason = await mallory.cut_off_reason()
        assert "flooding" in reason and "duplicate" in reason
        assert a.state.applied_ops == 2
        nursery.cancel_scope.cancel()


async def test_message_flood_is_cut_off_and_a_repeat_offender_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Node("a")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        for _ in range(-gs.REFUSE_SCORE // gs.CUT_OFF_PENALTY):
            mallory = RawPeer(a)
            await mallory.up()
            for _ in range(int(gs.MESSAGE_BURST) + 10):
                await mallory.say(gs.VECTOR(heads={}, ask=False))
            assert "flooding" in await mallory.cut_off_reason()
        refused = RawPeer(a)
        await refused.up()
        assert "refused: score" in await refused.cut_off_reason()
        nursery.cancel_scope.cancel()


async def test_a_device_with_another_identity_is_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = Node("a")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        impostor = RawPeer(a, identity=bytes(32))
        await impostor.up()
        assert "another identity" in await impostor.cut_off_reason()
        nursery.cancel_scope.cancel()


# -- over the real wire ------------------------------------------------------------------------


async def _serve_connection(node: Node, connection: SecureConnection) -> None:
    """What the transport actor does for one authenticated connection."""
    peer = connection.peer
    peer_id = peer.device_id.hex()
    send, receive = trio.open_memory_channel[Message](16)
    await node.address.send(
        gs.PeerUp(
            peer_id, peer.identity_public_key, peer.identity_public_key == node.identity, send
        )
    )

    async def outbound(cancel: trio.CancelScope) -> None:
        async for message in receive:
            await connection.send(message)
        cancel.cancel()  # gossip is done with this peer (e.g. cut it off)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbound, nursery.cancel_scope)
        try:
            while True:
                await node.address.send(gs.Inbound(peer_id, await connection.receive()))
        except WireError:
            nursery.cancel_scope.cancel()
    with trio.CancelScope(shield=True):
        await node.address.send(gs.PeerDown(peer_id))
        await connection.aclose()


async def _listen(
    network: MemoryNetwork,
    node: Node,
    credentials: DeviceCredentials,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    async def handler(stream: MessageStream) -> None:
        connection = await secure_connection(
            stream, credentials, initiator=False, registry=gs.GOSSIP_REGISTRY
        )
        await _serve_connection(node, connection)

    await network.listen(f"mem://{node.name}", handler, task_status=task_status)


async def _dial(
    network: MemoryNetwork, node: Node, credentials: DeviceCredentials, address: str
) -> None:
    async with network.dial(address) as stream:
        connection = await secure_connection(
            stream, credentials, initiator=True, registry=gs.GOSSIP_REGISTRY
        )
        await _serve_connection(node, connection)


async def test_devices_converge_over_noise_and_a_stranger_is_not_synced_with(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = Node("a"), Node("b")
    stranger = Node("stranger", seed=STRANGER_SEED)
    network = MemoryNetwork()
    credentials = {
        node.name: TestIdentity(SigningKey(node.seed)).new_device(node.device_id)
        for node in (a, b, stranger)
    }
    async with trio.open_nursery() as nursery:
        for node in (a, b, stranger):
            await node.start(nursery)
        address = await nursery.start(_listen, network, a, credentials["a"])
        nursery.start_soon(_dial, network, b, credentials["b"], address)
        nursery.start_soon(_dial, network, stranger, credentials["stranger"], address)
        m1 = await a.add("over noise")
        m2 = await b.add("back over noise")
        await stranger.add("a stranger's memory")
        await eventually(lambda: same(a, b) and {m1, m2} <= set(b.state.memories))
        assert len(a.state.memories) == 2 and len(stranger.state.memories) == 1
        peers = {p.peer_id: p for p in (await a.status()).peers}
        assert peers[b.device_id.hex()].is_device
        assert not peers[stranger.device_id.hex()].is_device
        nursery.cancel_scope.cancel()


# -- measurements -------------------------------------------------------------------------------


@pytest.mark.benchmark
@pytest.mark.parametrize("count", [2_000, 10_000])
async def test_measure_catch_up_after_a_partition(tmp_path: Path, count: int) -> None:
    """Real clock, durable logs: memories made on one device while the other was away, then the
    two reconnect. Prints ops/s, time to converge and wire bytes per memory."""
    a = Node("a", log=gs.FeedLog(tmp_path / "a.log"))
    b = Node("b", log=gs.FeedLog(tmp_path / "b.log"))
    wire = Wire()
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        made = trio.current_time()
        for i in range(count):
            await a.add(f"memory number {i}: " + "lorem ipsum " * 20)
        made = trio.current_time() - made
        envelope_bytes = sum(len(e) for e in a.state.memories.values())
        start = trio.current_time()
        await connect(nursery, a, b, wire)
        await eventually(lambda: len(b.state.memories) == count, deadline=300)
        elapsed = trio.current_time() - start
        total = sum(wire.bytes_by_type.values())
        print(
            f"\n{count} memories published locally in {made:.2f}s ({count / made:.0f}/s); "
            f"after reconnecting, converged in {elapsed:.2f}s = {count / elapsed:.0f} ops/s; "
            f"{total / count:.0f} wire bytes/memory (envelope {envelope_bytes / count:.0f}, "
            f"before Noise framing); {wire.messages} messages; by type {wire.bytes_by_type}"
        )
        assert total / count < envelope_bytes / count + 300
        nursery.cancel_scope.cancel()


@pytest.mark.benchmark
async def test_measure_live_replication_rate(tmp_path: Path) -> None:
    """Real clock, durable logs, connected devices: how fast do local adds show up remotely?"""
    count = 1_000
    a = Node("a", log=gs.FeedLog(tmp_path / "a.log"))
    b = Node("b", log=gs.FeedLog(tmp_path / "b.log"))
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        await b.start(nursery)
        await connect(nursery, a, b)
        start = trio.current_time()

        async def writer(first: int) -> None:
            for i in range(first, count, 8):
                await a.add(f"live memory {i}")

        async with trio.open_nursery() as writers:  # 8 concurrent clients (agents)
            for first in range(8):
                writers.start_soon(writer, first)
        await eventually(lambda: len(b.state.memories) == count, deadline=300)
        elapsed = trio.current_time() - start
        print(
            f"\n{count} live adds replicated in {elapsed:.2f}s = {count / elapsed:.0f} ops/s "
            "(publish + push + verify + apply + durable log on both sides)"
        )
        nursery.cancel_scope.cancel()
