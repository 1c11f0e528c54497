"""`AskOwn`: whether a storage-mode peer holds our device PSK, asked inside its session
(actors._own_probe). Real transports, real Noise sessions over the memory network."""

from __future__ import annotations

import os

import trio

from actors import _own_probe as own_probe
from actors.runtime import Ok, call
from actors.transport import AskOwn, DialStorage
from tests.actors.test_transport_modes import running
from wire import MemoryNetwork
from wire.testing import TestIdentity, new_storage_credentials


async def _ask_over_storage_mode(
    home_identity: TestIdentity, laptop_identity: TestIdentity
) -> bool:
    network = MemoryNetwork()
    home = home_identity.new_device(storage=new_storage_credentials())
    laptop = laptop_identity.new_device(storage=new_storage_credentials())
    async with running(network, "mem://home", home), running(network, "mem://laptop", laptop) as a:
        with trio.fail_after(30):
            dialed = await call(a.address, DialStorage, "mem://home", None)
            assert isinstance(dialed, Ok), dialed
            assert not dialed.value.is_device  # a storage session: it shows its storage key
            answer = await call(a.address, AskOwn, dialed.value.peer)
    assert isinstance(answer, Ok), answer
    return answer.value


async def test_one_of_our_devices_in_storage_mode_says_it_is_ours() -> None:
    me = TestIdentity.generate()
    assert await _ask_over_storage_mode(me, me)


async def test_another_identitys_node_is_not_ours() -> None:
    assert not await _ask_over_storage_mode(TestIdentity.generate(), TestIdentity.generate())


def test_a_tag_proves_the_psk_for_this_session_and_role_only() -> None:
    psk, other_psk = os.urandom(32), os.urandom(32)
    session, other_session = os.urandom(32), os.urandom(32)
    question = own_probe.ask()
    # We dialed; the side we dialed answers.
    right = own_probe.answer(question, psk, session, initiated=False)
    assert own_probe.is_ours(question, right, psk, session, we_initiated=True)
    # Another PSK, another session (a relayed tag), or the asker's own role (our question
    # reflected back at us and our answer returned) prove nothing.
    for wrong in (
        own_probe.answer(question, other_psk, session, initiated=False),
        own_probe.answer(question, psk, other_session, initiated=False),
        own_probe.answer(question, psk, session, initiated=True),
        own_probe.answer(question, None, session, initiated=False),
        own_probe.answer(own_probe.ask(), psk, session, initiated=False),  # another nonce
    ):
        assert not own_probe.is_ours(question, wrong, psk, session, we_initiated=True)
