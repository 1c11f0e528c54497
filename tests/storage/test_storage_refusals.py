"""The storage service refuses, with a reason: other identities' data, over quota, unsigned
deletes, our own devices; and it serves the owner (put, get, audit, signed delete)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from nacl.signing import SigningKey

from actors import storage as sg
from actors.node import DEVICE_REGISTRY
from dmgn import storage_protocol as sp
from dmgn.identity import derived_key
from dmgn.shards import DELETE_CONTEXT, delete_payload
from tests.storage._cluster import cluster, seed_of
from wire import Message, Mode, SecureConnection, secure_connection
from wire.testing import TestIdentity
from wire.websocket import WebSocketNetwork

#: What a node's connections speak (a device of ours also gets the query router's hello).
REGISTRY = DEVICE_REGISTRY


@asynccontextmanager
async def client(address: str, key: SigningKey) -> AsyncIterator[SecureConnection]:
    """A storage-mode session (what every stranger gets) from a fresh node."""
    device = TestIdentity(SigningKey(os.urandom(32))).new_device()
    async with WebSocketNetwork().dial(address) as stream:
        yield await secure_connection(
            stream, device, initiator=True, mode=Mode.STORAGE, registry=REGISTRY
        )


def prove(key: SigningKey, connection: SecureConnection) -> bytes:
    """``key``'s owner proof for the storage peer at the other end of ``connection``."""
    storage_key = connection.peer.identity_public_key
    return key.sign(sp.OWNER_PROOF_CONTEXT + sp.owner_proof_message(storage_key)).signature


async def ask(connection: SecureConnection, message: Message) -> Message:
    await connection.send(message)
    with trio.fail_after(20):
        while True:
            answer = await connection.receive()
            if answer.type == sp.REPLY.name and answer["rid"] == message["rid"]:
                return answer


def oid(n: int) -> bytes:
    return hashlib.sha256(b"object %d" % n).digest()


async def test_owner_puts_gets_audits_and_deletes_with_its_signature() -> None:
    async with cluster() as nodes:
        holder = await nodes.start("holder", "holder")
        key = SigningKey(os.urandom(32))
        owner = bytes(key.verify_key)
        async with client(holder.address, key) as conn:
            proof_owner = prove(key, conn)
            # The holder shows its storage key, not its identity.
            assert conn.peer.identity_public_key != bytes(SigningKey(seed_of("holder")).verify_key)
            blob = os.urandom(1040)
            put = await ask(
                conn, sp.PUT(rid=1, owner=owner, proof=proof_owner, oids=[oid(1)], blobs=[blob])
            )
            # Charged: the bytes and what a row costs beside them.
            assert put["code"] == "" and put["used"] == len(blob) + sg.ROW_OVERHEAD
            got = await ask(
                conn, sp.GET(rid=2, owner=owner, proof=proof_owner, oids=[oid(1), oid(2)])
            )
            assert got["oids"] == [oid(1)] and got["blobs"] == [blob]
            nonce = os.urandom(32)
            audit = await ask(
                conn, sp.AUDIT(rid=3, owner=owner, proof=proof_owner, oids=[oid(1)], nonce=nonce)
            )
            assert audit["proofs"] == [hashlib.sha256(nonce + blob).digest()]
            at = time.time_ns()
            sig = key.sign(DELETE_CONTEXT + delete_payload(owner, at, [oid(1)])).signature
            deleted = await ask(
                conn,
                sp.DELETE(rid=4, owner=owner, proof=proof_owner, oids=[oid(1)], at=at, sig=sig),
            )
            assert deleted["code"] == "" and deleted["count"] == 1
            gone = await ask(conn, sp.GET(rid=5, owner=owner, proof=proof_owner, oids=[oid(1)]))
            assert gone["oids"] == []
        status = await holder.storage()
        assert status.objects == 0 and status.bytes_held == 0


async def test_other_identities_data_over_quota_and_unsigned_deletes_are_refused() -> None:
    limits = sg.StorageLimits(quota=1 << 20, per_owner_quota=4096)
    async with cluster() as nodes:
        holder = await nodes.start("holder", "holder", storage_limits=limits)
        alice_key, mallory_key = SigningKey(os.urandom(32)), SigningKey(os.urandom(32))
        alice = bytes(alice_key.verify_key)
        async with client(holder.address, alice_key) as conn:
            proof_alice = prove(alice_key, conn)
            stored = await ask(
                conn,
                sp.PUT(rid=1, owner=alice, proof=proof_alice, oids=[oid(1)], blobs=[b"x" * 3000]),
            )
            assert stored["code"] == ""
            over = await ask(
                conn,
                sp.PUT(rid=2, owner=alice, proof=proof_alice, oids=[oid(2)], blobs=[b"y" * 3000]),
            )
            assert over["code"] == "quota" and "over quota" in over["reason"]
        async with client(holder.address, mallory_key) as conn:
            proof_alice = prove(mallory_key, conn)  # mallory cannot make alice's proof
            theft = await ask(conn, sp.GET(rid=3, owner=alice, proof=proof_alice, oids=[oid(1)]))
            assert theft["code"] == "refused" and "another owner" in theft["reason"]
            assert "blobs" not in theft.fields
            at = time.time_ns()
            forged = mallory_key.sign(DELETE_CONTEXT + delete_payload(alice, at, [oid(1)]))
            delete = await ask(
                conn,
                sp.DELETE(
                    rid=4,
                    owner=alice,
                    proof=proof_alice,
                    oids=[oid(1)],
                    at=at,
                    sig=forged.signature,
                ),
            )
            assert delete["code"] == "refused"
            mallory = bytes(mallory_key.verify_key)
            proof_mallory = prove(mallory_key, conn)
            unsigned = await ask(
                conn,
                sp.DELETE(
                    rid=5,
                    owner=mallory,
                    proof=proof_mallory,
                    oids=[oid(1)],
                    at=at,
                    sig=forged.signature,
                ),
            )
            assert unsigned["code"] == "refused" and "not signed by the owner" in unsigned["reason"]
        # Our own devices never store with us.
        own_key = SigningKey(derived_key(seed_of("holder"), "storage-owner"))
        async with client(holder.address, own_key) as conn:
            own = bytes(own_key.verify_key)
            proof_own = prove(own_key, conn)
            refused = await ask(
                conn, sp.PUT(rid=6, owner=own, proof=proof_own, oids=[oid(3)], blobs=[b"z"])
            )
            assert refused["code"] == "refused" and "own devices" in refused["reason"]
            # Without a valid proof, our owner key gets the refusal any stranger gets: knowing
            # an owner key (a storage peer of ours does) must not find our other devices.
            junk = await ask(
                conn, sp.PUT(rid=7, owner=own, proof=bytes(64), oids=[oid(3)], blobs=[b"z"])
            )
            assert junk["code"] == "refused" and "own devices" not in junk["reason"]
            assert "proof does not verify" in junk["reason"]
        status = await holder.storage()
        assert status.objects == 1 and status.identities == 1
        assert status.refused == {"quota": 1, "refused": 5}


async def test_a_proof_made_for_another_storage_peer_is_refused() -> None:
    """A storage peer that received our owner proof cannot use it at another node (it names
    the storage key it was made for)."""
    async with cluster() as nodes:
        first = await nodes.start("first", "first")
        second = await nodes.start("second", "second")
        key = SigningKey(os.urandom(32))
        owner = bytes(key.verify_key)
        async with client(first.address, key) as conn:
            proof_for_first = prove(key, conn)
            stored = await ask(
                conn, sp.PUT(rid=1, owner=owner, proof=proof_for_first, oids=[oid(1)], blobs=[b"x"])
            )
            assert stored["code"] == ""
        async with client(second.address, key) as conn:
            replayed = await ask(
                conn, sp.GET(rid=2, owner=owner, proof=proof_for_first, oids=[oid(1)])
            )
            assert replayed["code"] == "refused" and "owner proof" in replayed["reason"]
