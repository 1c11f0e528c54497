"""A storage node that holds anything for others starts again from its file (issue 30, item 1).

It could not: the service built each owner's rate buckets in the worker thread that read the
file, and the buckets read Trio's clock, which answers only in the Trio thread. Every storage
node died at its first restart.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from actors import storage as sg
from actors._storage_tables import DuckStorageTables
from actors.runtime import Ok, Result, call, expect
from tests.storage._cluster import Member, cluster, eventually
from wire import Message, PeerIdentity


async def _nowhere(peer: PeerIdentity, message: Message) -> Result[None]:
    return Ok(None)


async def test_service_starts_on_a_file_holding_objects_and_mail_for_another_owner(
    tmp_path: Path,
) -> None:
    path = tmp_path / "storage.duckdb"
    other = os.urandom(32)
    tables = DuckStorageTables(path)
    tables.put_objects(other, [os.urandom(32)], [b"s" * 528], 1)
    tables.write_mail(other, b"stream", 1, [b"m" * 100])
    tables.close()

    service = sg.StorageService(
        path, owner=os.urandom(32), storage_key=os.urandom(32), send=_nowhere
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        status = await expect(await call(service.mailbox.address, sg.StorageState))
        nursery.cancel_scope.cancel()
    assert (status.bytes_held, status.identities, status.objects, status.mail_items) == (
        628 + 2 * sg.ROW_OVERHEAD,
        1,
        1,
        1,
    )


async def test_feed_entries_the_outbox_missed_reach_the_mailbox_after_a_restart(
    tmp_path: Path,
) -> None:
    # Gossip appends an entry to the feed log (durable: the write is answered) and then hands
    # it to the shard keeper, which seals it into its outbox for the mailbox. A kill -9 in
    # between leaves a feed the outbox lacks the end of; its next entries were pushed after a
    # hole that no device could read past. Built here without the race: shards.duckdb as it
    # was after the first entry, with the feed log of three.
    data_dir, device = tmp_path / "a", os.urandom(16)
    keeper_file = data_dir / "shards.duckdb"
    async with cluster() as nodes:
        a = await nodes.start("a", "a", data_dir=data_dir, device_id=device, bootstrap=())
        await a.add("the first note")
        await eventually(lambda: _mailbox_is(a, 1))
        await a.stop()
        first = await trio.Path(keeper_file).read_bytes()
        a = await nodes.start("a", "a", data_dir=data_dir, device_id=device, bootstrap=())
        await a.add("the second note")
        await a.add("the third note")
        await eventually(lambda: _mailbox_is(a, 3))
        await a.stop()
        await trio.Path(keeper_file).write_bytes(first)

        storage = await nodes.start("s", "s", bootstrap=())
        a = await nodes.start(
            "a", "a", data_dir=data_dir, device_id=device, bootstrap=(storage.address,)
        )
        await eventually(lambda: _mailbox_is(a, 3), deadline=15)

        async def pushed() -> bool:
            return (await storage.storage()).mail_items == 3

        await eventually(pushed, deadline=20)


async def _mailbox_is(member: Member, entries: int) -> bool:
    return (await member.durability()).mailbox_items == entries
