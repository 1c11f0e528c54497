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
