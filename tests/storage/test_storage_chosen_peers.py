"""Only storage peers we chose (we dialed them: bootstrap, add_peer, DHT provider records)
get our shards and our owner key. A stranger that dials us is served by our storage service
but is never handed to our shard keeper: it would receive our owner key within a second (mail
heads, puts), and the same owner key from two of our devices would pair them for anyone who
simply dials both (issue 20)."""

from __future__ import annotations

import trio

from dmgn import api
from tests.storage._cluster import cluster, eventually
from tests.sync.test_sync_processes import free_port


async def test_a_stranger_that_dials_us_is_not_our_storage_peer() -> None:
    async with cluster() as nodes:
        owner = await nodes.start("owner", "owner", bootstrap=())
        for i in range(3):
            await owner.add(f"memory {i} of the owner")
        stranger = await nodes.start("stranger", "stranger", bootstrap=(owner.address,))

        async def stranger_connected() -> bool:
            status = await owner.node.request(api.Status())
            return bool(status["peers"] >= 1)

        await eventually(stranger_connected)
        # Time for the keeper to have asked it for mail heads or placed shards, had it been
        # handed over (the keeper pulls within ~0.2 s of a new storage peer).
        await trio.sleep(2.0)
        assert (await owner.durability()).storage_peers == 0
        held = await stranger.storage()
        assert held.objects == 0 and held.mail_items == 0
        assert held.identities == 0

        # The same stranger, dialed by the owner, is a storage peer and gets shards.
        chosen = await nodes.start("chosen", "chosen", bootstrap=())
        owner_again = await nodes.start("owner2", "owner", bootstrap=(chosen.address,))

        async def chosen_used() -> bool:
            return (await owner_again.durability()).storage_peers == 1

        await eventually(chosen_used)


async def test_two_nodes_that_chose_each_other_are_each_the_others_storage_peer() -> None:
    # Each has the other as its bootstrap peer (as the restart matrix's nodes first did). Both
    # dials reach the same pair of devices and the transport keeps one connection, the one the
    # node with the smaller Noise key started; the other node's dial (at its start, or its
    # redial after a restart) finds that one. It chose that peer all the same: without this,
    # one of the two never had the other as a storage peer.
    ports = free_port(), free_port()
    first, second = (f"ws://127.0.0.1:{port}" for port in ports)
    async with cluster() as nodes:
        a = await nodes.start("a", "a", listen_addr=first, bootstrap=(second,))
        b = await nodes.start("b", "b", listen_addr=second, bootstrap=(first,))
        await a.add("a's memory, for b to hold")
        await b.add("b's memory, for a to hold")

        async def each_holds_the_others() -> bool:
            peers = [(await m.durability()).storage_peers for m in (a, b)]
            held = [(await m.storage()).objects for m in (a, b)]
            return peers == [1, 1] and held == [1, 1]

        await eventually(each_holds_the_others, deadline=15)
