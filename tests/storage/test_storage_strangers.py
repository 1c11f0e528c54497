"""Strangers who mint owner keys, flood refusals or ask for more than a batch (issue 30, items 2,
4, 5, 6): owner keys are free, so the storage service meters source addresses and connections
too; refusals are logged a line per kind a minute; a read loads at most one batch."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from nacl.signing import SigningKey

from actors import storage as sg
from actors._storage_tables import DuckStorageTables, StorageTables
from actors.runtime import Ok, Result, call, expect
from dmgn import storage_protocol as sp
from dmgn.shards import MAX_MAIL_ITEM_BYTES
from tests.storage._cluster import cluster
from tests.storage.test_storage_refusals import REGISTRY, ask, oid, prove
from wire import Message, Mode, PeerIdentity, SchemaError, SecureConnection, secure_connection
from wire.testing import TestIdentity
from wire.websocket import WebSocketNetwork


@asynccontextmanager
async def stranger(address: str, source: str) -> AsyncIterator[SecureConnection]:
    """A storage-mode session from a fresh node leaving from ``source`` (any 127/8 address)."""
    device = TestIdentity(SigningKey(os.urandom(32))).new_device()
    async with WebSocketNetwork(source_address=source).dial(address) as stream:
        yield await secure_connection(
            stream, device, initiator=True, mode=Mode.STORAGE, registry=REGISTRY
        )


async def test_a_fresh_key_flood_from_one_address_is_capped_another_is_served_logs_stay_short(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dmgn.storage")
    fresh, junk = 64, 3000
    async with cluster() as nodes:
        holder = await nodes.start("holder", "holder")
        async with (
            stranger(holder.address, "127.0.0.10") as flood,
            stranger(holder.address, "127.0.0.20") as honest,
        ):
            codes: dict[str, int] = {}
            honest_answers: list[Message] = []

            async def send_flood() -> None:
                for n in range(fresh):
                    key = SigningKey(os.urandom(32))
                    await flood.send(
                        sp.PUT(
                            rid=n,
                            owner=bytes(key.verify_key),
                            proof=prove(key, flood),
                            oids=[oid(n)],
                            blobs=[b"f" * 1024],
                        )
                    )
                for n in range(fresh, fresh + junk):
                    await flood.send(sp.MAIL_HEADS(rid=n, owner=os.urandom(32), proof=bytes(64)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_flood)
                for n in range(fresh + junk):
                    answer = await flood.receive()
                    assert answer.type == sp.REPLY.name
                    code = answer.get_str("code")
                    codes[code] = codes.get(code, 0) + 1
                    if n < fresh and code == "rate":
                        assert "new owner keys" in answer.get_str("reason")
                    if n == fresh + junk // 2:
                        # Mid-flood: an owner from another address is served.
                        key = SigningKey(os.urandom(32))
                        owner, proof = bytes(key.verify_key), prove(key, honest)
                        honest_answers.append(
                            await ask(
                                honest,
                                sp.PUT(
                                    rid=1, owner=owner, proof=proof, oids=[oid(1)], blobs=[b"h"]
                                ),
                            )
                        )
                        honest_answers.append(
                            await ask(
                                honest, sp.GET(rid=2, owner=owner, proof=proof, oids=[oid(1)])
                            )
                        )
        status = await holder.storage()
    # Only the first NEW_OWNERS_PER_ADDRESS fresh keys were served (all 64 were before).
    assert codes[""] == sg.NEW_OWNERS_PER_ADDRESS
    assert sum(codes.values()) == fresh + junk
    assert [a.get_str("code") for a in honest_answers] == ["", ""]
    assert honest_answers[1]["blobs"] == [b"h"]
    assert sum(status.refused.values()) == fresh + junk - sg.NEW_OWNERS_PER_ADDRESS
    # One line per kind of refusal (3,048 lines before): put/rate, mail.heads/refused (and
    # mail.heads/rate if the address's burst ran out).
    lines = [r for r in caplog.records if r.name == "dmgn.storage" and "refused" in r.message]
    assert 2 <= len(lines) <= 3, [r.message for r in lines]
    assert all(r.levelno <= logging.WARNING and r.exc_info is None for r in lines)


# -- in process: the service alone, on a file ---------------------------------------------------

PEER = PeerIdentity(os.urandom(32), os.urandom(16), os.urandom(32))
STORAGE_KEY = os.urandom(32)


class Owner:
    def __init__(self) -> None:
        self.key = SigningKey(os.urandom(32))
        self.owner = bytes(self.key.verify_key)
        message = sp.OWNER_PROOF_CONTEXT + sp.owner_proof_message(STORAGE_KEY)
        self.proof = self.key.sign(message).signature


@asynccontextmanager
async def service(
    path: Path | None, limits: sg.StorageLimits, tables: StorageTables | None = None
) -> AsyncIterator[tuple[sg.StorageService, trio.MemoryReceiveChannel[Message]]]:
    sent, replies = trio.open_memory_channel[Message](1000)

    async def send(peer: PeerIdentity, message: Message) -> Result[None]:
        sent.send_nowait(message)
        return Ok(None)

    running = sg.StorageService(
        path, owner=os.urandom(32), storage_key=STORAGE_KEY, send=send, limits=limits, tables=tables
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(running.run)
        yield running, replies
        nursery.cancel_scope.cancel()


async def serve(
    running: tuple[sg.StorageService, trio.MemoryReceiveChannel[Message]],
    message: Message,
    address: str,
    peer: PeerIdentity = PEER,
) -> Message:
    service_, replies = running
    await service_.mailbox.address.send(sg.StorageRequest(peer, message, address))
    answer = await replies.receive()
    assert answer["rid"] == message["rid"]
    return answer


async def put(running: object, who: Owner, n: int, size: int, address: str) -> str:
    message = sp.PUT(rid=n, owner=who.owner, proof=who.proof, oids=[oid(n)], blobs=[b"x" * size])
    answer = await serve(running, message, address)  # type: ignore[arg-type]
    return answer.get_str("code")


async def test_owners_from_one_address_share_its_quota_across_a_restart(tmp_path: Path) -> None:
    """Four fresh keys from one address hold at most ``per_address_quota`` together (one
    stranger filled a whole node with four before); the bound holds after a restart."""
    path = tmp_path / "storage.duckdb"
    limits = sg.StorageLimits(quota=4 << 20, per_owner_quota=1 << 20, per_address_quota=1 << 20)
    a, b = "ws://198.51.100.7:4000", "ws://203.0.113.9:4000"
    owners = [Owner() for _ in range(5)]
    async with service(path, limits) as running:
        assert await put(running, owners[0], 1, 700_000, a) == ""
        assert [await put(running, o, 2, 700_000, a) for o in owners[1:4]] == ["quota"] * 3
        assert await put(running, owners[4], 3, 700_000, b) == ""
    async with service(path, limits) as running:
        # Restarted: the first owner is still counted against a, wherever it asks from now.
        assert await put(running, owners[1], 4, 700_000, a) == "quota"
        assert await put(running, owners[0], 5, 700_000, b) == "quota"
        assert await put(running, Owner(), 6, 700_000, "ws://192.0.2.1:1") == ""


async def test_ipv6_addresses_in_one_64_are_one_source() -> None:
    one = sg.source_of("ws://[2001:db8:1:2:aaaa::1]:4000")
    assert one == sg.source_of("ws://[2001:db8:1:2:ffff:1:2:3]:9") == "2001:db8:1:2::/64"
    assert sg.source_of("ws://[2001:db8:1:3::1]:4000") != one
    assert sg.source_of("ws://[::ffff:192.0.2.1]:1") == sg.source_of("ws://192.0.2.1:2")
    assert sg.source_of("mem://node-7") == "mem://node-7"


class CountingTables(DuckStorageTables):
    """Counts the bytes of every blob the service had read from the file."""

    loaded = 0

    def read_objects(self, owner: bytes, oids: list[bytes], max_bytes: int) -> dict[bytes, bytes]:
        found = super().read_objects(owner, oids, max_bytes)
        self.loaded += sum(len(b) for b in found.values())
        return found

    def mail_range(
        self, owner: bytes, stream: bytes, first: int, last: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        rows = super().mail_range(owner, stream, first, last, max_bytes)
        self.loaded += sum(len(b) for _, b in rows)
        return rows


async def test_a_pull_or_get_of_many_large_items_loads_one_batch() -> None:
    tables = CountingTables(None)
    who, stream, item = Owner(), os.urandom(16), os.urandom(300_000)
    for seq in range(1, 11):
        tables.write_mail(who.owner, stream, seq, [item])
    tables.put_objects(who.owner, [oid(n) for n in range(10)], [item] * 10, 1)
    limits = sg.StorageLimits()
    async with service(None, limits, tables) as running:
        pull = sp.MAIL_PULL(
            rid=1, owner=who.owner, proof=who.proof, stream=stream, first=1, last=256
        )
        pulled = await serve(running, pull, "ws://192.0.2.1:1")
        get = sp.GET(rid=2, owner=who.owner, proof=who.proof, oids=[oid(n) for n in range(10)])
        got = await serve(running, get, "ws://192.0.2.1:1")
        audit = sp.AUDIT(
            rid=3,
            owner=who.owner,
            proof=who.proof,
            oids=[oid(n) for n in range(10)],
            nonce=b"n" * 32,
        )
        audited = await serve(running, audit, "ws://192.0.2.1:1")
    # Two 300 KB items fit 768 KiB, a third would not: each answer carries two.
    assert len(pulled["items"]) == 2 and len(got["blobs"]) == 2
    # Every object is audited (a missing proof would fail the audit), a batch at a time.
    assert len(audited["proofs"]) == 10
    # What was loaded: the two answers' blobs and the audit's ten, nothing more (3 MB each).
    assert tables.loaded == 14 * len(item)


def test_mail_items_and_pushes_are_capped_at_what_a_keeper_sends() -> None:
    who, stream = Owner(), os.urandom(16)
    with pytest.raises(SchemaError):
        sp.MAIL_PUSH(
            rid=1,
            owner=who.owner,
            proof=who.proof,
            stream=stream,
            first=1,
            items=[bytes(MAX_MAIL_ITEM_BYTES + 1)],
        )
    assert MAX_MAIL_ITEM_BYTES <= sp.MAX_BATCH_BYTES  # a whole item fits one push


async def test_a_push_over_one_batch_is_refused() -> None:
    who, stream = Owner(), os.urandom(16)
    big = [bytes(MAX_MAIL_ITEM_BYTES)] * 2
    async with service(None, sg.StorageLimits()) as running:
        push = sp.MAIL_PUSH(
            rid=1, owner=who.owner, proof=who.proof, stream=stream, first=1, items=big
        )
        answer = await serve(running, push, "ws://192.0.2.1:1")
        status = await expect(await call(running[0].mailbox.address, sg.StorageState))
    assert answer.get_str("code") == "bad_request"
    assert status.mail_items == 0


async def test_tiny_objects_are_charged_what_a_row_costs_and_meters_stay_bounded() -> None:
    who = Owner()
    limits = sg.StorageLimits(quota=1 << 30, new_owners_per_address=10**6)
    async with service(None, limits) as running:
        message = sp.PUT(
            rid=1,
            owner=who.owner,
            proof=who.proof,
            oids=[oid(n) for n in range(256)],
            blobs=[b"t"] * 256,
        )
        answer = await serve(running, message, "ws://192.0.2.1:1")
        assert answer["used"] == 256 * (1 + sg.ROW_OVERHEAD)
        # Fresh owners, each from its own address and connection: every one is served, and
        # the rate meters kept stay bounded (the least recently used go).
        for n in range(sg.MAX_METERS + 50):
            fresh = Owner()
            heads = sp.MAIL_HEADS(rid=n, owner=fresh.owner, proof=fresh.proof)
            peer = PeerIdentity(os.urandom(32), os.urandom(16), os.urandom(32))
            answer = await serve(running, heads, f"ws://10.0.{n >> 8}.{n & 255}:1", peer)
            assert answer.get_str("code") == ""
        service_ = running[0]
        assert len(service_._owner_meters) == sg.MAX_METERS
        assert len(service_._address_meters) == sg.MAX_METERS
        assert len(service_._connection_meters) == sg.MAX_METERS


async def test_the_storage_file_gets_a_memory_limit_from_the_quota_and_one_thread(
    tmp_path: Path,
) -> None:
    path = tmp_path / "storage.duckdb"
    limits = sg.StorageLimits(quota=64 << 20)
    async with service(path, limits) as running:
        tables = running[0]._db
        assert isinstance(tables, DuckStorageTables)
        settings = dict(
            tables._db.execute(
                "SELECT name, value FROM duckdb_settings() "
                "WHERE name IN ('memory_limit', 'threads')"
            ).fetchall()
        )
    # Twice the quota and 64 MiB: a checkpoint must be able to pin what it rewrites.
    assert settings == {"memory_limit": "192.0 MiB", "threads": "1"}


def test_a_quota_full_of_the_largest_items_checkpoints_within_the_memory_limit(
    tmp_path: Path,
) -> None:
    """At 64 MiB, DuckDB's checkpoint failed FATALly at 62.5 MiB of 512 KiB items."""
    limits = sg.StorageLimits(quota=64 << 20)
    tables = DuckStorageTables(tmp_path / "storage.duckdb", memory_limit=limits.duckdb_memory)
    owner, stream, item = os.urandom(32), os.urandom(16), os.urandom(MAX_MAIL_ITEM_BYTES)
    try:
        for _ in range(2):  # stored, then every item replaced
            for seq in range(1, limits.quota // len(item) + 1):
                tables.write_mail(owner, stream, seq, [item])
        tables._db.execute("CHECKPOINT")
        assert len(tables.mail_range(owner, stream, 1, 256, sp.MAX_BATCH_BYTES)) == 1
    finally:
        tables.close()
