"""Strings that are not text (lone UTF-16 surrogates, which JSON carries as ``"\\udc00"``) are
refused by name at every door, and the vault answers an ``Err`` rather than crash on them.

Before issue 30 only ``content`` was checked: a surrogate in a metadata key or value passed the
request models and crashed the vault actor inside msgpack; six such requests a minute spent the
supervisor's crash budget and stopped the node.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import trio

from actors.runtime import Err, Ok, call
from actors.vault import Seal, VaultActor, Whoami
from dmgn import api
from dmgn.errors import InvalidInput
from dmgn.memory import Memory

LONE = "\udc00"

#: Every string field of every request a caller can send, with a surrogate in it, and the
#: field the refusal must name.
BAD_REQUESTS: list[tuple[str, Callable[[], Any], str]] = [
    ("metadata value", lambda: api.AddMemory(content="x", metadata={"k": LONE}), "metadata.k"),
    ("metadata key", lambda: api.AddMemory(content="x", metadata={LONE: "v"}), "metadata"),
    ("content", lambda: api.AddMemory(content="x" + LONE), "content"),
    ("link id", lambda: api.AddMemory(content="x", links=[LONE]), "links.0"),
    ("link type of an add", lambda: api.AddMemory(content="x", link_type=LONE), "link_type"),
    (
        "bulk metadata",
        lambda: api.AddMemories(memories=[{"content": "x", "metadata": {"k": LONE}}]),
        "metadata.k",
    ),
    ("query text", lambda: api.QueryMemories(text="heron" + LONE), "text"),
    ("links_of", lambda: api.QueryMemories(links_of=LONE), "links_of"),
    ("get id", lambda: api.GetMemory(id=LONE), "id"),
    ("delete id", lambda: api.DeleteMemory(id=LONE), "id"),
    ("link from", lambda: api.LinkMemories(from_id=LONE, to_id="ab" * 32), "from_id"),
    ("edge type", lambda: api.LinkMemories(from_id="a", to_id="b", edge_type=LONE), "edge_type"),
    ("graph start", lambda: api.GetGraph(start_id=LONE), "start_id"),
    ("backup path", lambda: api.Backup(path="/tmp/" + LONE), "path"),
]


@pytest.mark.parametrize(("what", "build", "field"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_every_string_field_refuses_text_that_is_not_utf8_naming_the_field(
    what: str, build: Callable[[], Any], field: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        build()
    message = str(refused.value)
    assert field in message and "not valid text" in message and "UTF-8" in message, message
    message.encode("utf-8")  # the sentence itself is printable: the bad string is not echoed


def test_wire_requests_are_refused_the_same_way() -> None:
    with pytest.raises(InvalidInput, match=r"'metadata\.k' is not valid text"):
        api.request_from_wire({"op": "add", "content": "x", "metadata": {"k": LONE}})


def test_text_outside_the_basic_plane_is_still_text() -> None:
    request = api.AddMemory(content="héron 🐦", metadata={"ключ": "値 🐦"}, link_type="近い")
    assert request.metadata == {"ключ": "値 🐦"}


async def test_the_vault_answers_an_err_for_unencodable_metadata_and_keeps_serving() -> None:
    vault = VaultActor(os.urandom(32), os.urandom(16))
    async with trio.open_nursery() as nursery:
        await nursery.start(vault.run)
        for metadata in ({"k": LONE}, {LONE: "v"}):
            sealed = await call(vault.mailbox.address, Seal, Memory("x", "text", 1, metadata))
            assert isinstance(sealed, Err), sealed
            assert sealed.code == "invalid_input" and "not valid text" in sealed.reason
        fine = await call(vault.mailbox.address, Seal, Memory("x", "text", 1, {"k": "v"}))
        assert isinstance(fine, Ok)
        assert isinstance(await call(vault.mailbox.address, Whoami), Ok)
        nursery.cancel_scope.cancel()
