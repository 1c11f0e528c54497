"""The vault actor: the only holder of the identity's secret keys.

Other actors never see the seed or the master key; they ask the vault to seal, open or sign.
The one deliberate exception is :class:`DeriveKey`: keys derived for a single purpose (the
indexer's snapshot key, the transport's Noise static key and device-handshake PSK
``noise-device-psk``) are handed out because their owners must use them on every operation;
the derivation is one-way, so holding one reveals nothing about the seed or the other keys.

Besides the identity key the vault holds two more signing keys (issue 20), both derived here
and never handed out:

* the **storage-node key** (``storage-node:<device>``): what this node presents to strangers
  in storage-mode handshakes instead of the identity. It is a one-way function of the seed and
  the random per-data-dir device id, so it differs per data dir and nobody without the seed
  can link it to the identity or to another device's storage key;
* the **storage-owner key** (``storage-owner``): one per identity, it owns what storage peers
  hold for us (quota, delete authorisation, restore), so a restore from the network needs only
  the vault export, yet it is not the identity key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import assert_never

import trio
from nacl.signing import SigningKey

from actors.runtime import Err, Mailbox, Reply
from dmgn.errors import DmgnError
from dmgn.feed import FEED_ENTRY_CONTEXT, FeedEntry, FeedError, FeedHead, Op, UnsignedEntry
from dmgn.identity import derived_key, master_key
from dmgn.memory import EnvelopeHeader, Memory, open_memory, seal_memory


@dataclass(frozen=True, slots=True)
class Seal:
    memory: Memory
    reply: Reply[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class SealFailed:
    reason: str
    code: str


@dataclass(frozen=True, slots=True)
class SealMany:
    """Seal a batch (a bulk import) in one round trip; failures come back per item."""

    memories: tuple[Memory, ...]
    reply: Reply[list[tuple[str, bytes] | SealFailed]]


@dataclass(frozen=True, slots=True)
class Opened:
    header: EnvelopeHeader
    memory: Memory


@dataclass(frozen=True, slots=True)
class OpenFailed:
    id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Open:
    """Verify and decrypt a batch of ``(id, envelope)``; failures come back per item."""

    envelopes: tuple[tuple[str, bytes], ...]
    reply: Reply[list[Opened | OpenFailed]]


@dataclass(frozen=True, slots=True)
class Sign:
    context: bytes
    data: bytes
    reply: Reply[bytes]


#: Which vault key signs a `SignAs`.
STORAGE_NODE = "storage-node"
STORAGE_OWNER = "storage-owner"


@dataclass(frozen=True, slots=True)
class SignAs:
    """Sign with the storage-node key or the storage-owner key (not the identity)."""

    signer: str
    context: bytes
    data: bytes
    reply: Reply[bytes]


@dataclass(frozen=True, slots=True)
class SignFeed:
    """Sign ops as the next entries of ``device_id``'s feed after ``head``, in order: a group of
    local publishes in one round trip instead of one :class:`Sign` per entry (each entry's hash,
    signature included, is the next one's ``prev_hash``, so only the signer can chain them).

    ``items`` are ``(at_ns, op)``. An op that cannot be an entry gets its ``Err`` in its place
    and takes no seq. A group above ``_THREAD_THRESHOLD`` is signed off the event loop.
    """

    head: FeedHead | None
    device_id: bytes
    items: tuple[tuple[int, Op], ...]
    reply: Reply[list[FeedEntry | Err]]


@dataclass(frozen=True, slots=True)
class DeriveKey:
    purpose: str
    reply: Reply[bytes]


@dataclass(frozen=True, slots=True)
class Identity:
    identity_id: str
    identity_public_key: bytes
    device_id: bytes
    #: The storage-owner key's public half (what storage peers hold our objects under).
    owner_public_key: bytes
    #: This node's storage-node key (what strangers see in a storage-mode handshake).
    storage_public_key: bytes


@dataclass(frozen=True, slots=True)
class Whoami:
    reply: Reply[Identity]


VaultMsg = Seal | SealMany | Open | Sign | SignAs | SignFeed | DeriveKey | Whoami

#: Batches of envelopes are opened off the event loop above this size; below it the thread hop
#: costs more than the work.
_THREAD_THRESHOLD = 32


class VaultActor:
    def __init__(self, seed: bytes, device_id: bytes, *, capacity: int = 64) -> None:
        self.mailbox: Mailbox[VaultMsg] = Mailbox("vault", capacity)
        self._seed = seed
        self._signing_key = SigningKey(seed)
        self._master_key = master_key(seed)
        self._device_id = device_id
        self._public = bytes(self._signing_key.verify_key)
        self._signers = {
            STORAGE_NODE: SigningKey(derived_key(seed, f"{STORAGE_NODE}:{device_id.hex()}")),
            STORAGE_OWNER: SigningKey(derived_key(seed, STORAGE_OWNER)),
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for message in self.mailbox:
            match message:
                case Seal():
                    self._seal(message)
                case SealMany():
                    if len(message.memories) > _THREAD_THRESHOLD:
                        sealed = await trio.to_thread.run_sync(self._seal_all, message.memories)
                    else:
                        sealed = self._seal_all(message.memories)
                    message.reply.ok(sealed)
                case Open():
                    await self._open(message)
                case Sign():
                    message.reply.ok(
                        self._signing_key.sign(message.context + message.data).signature
                    )
                case SignAs():
                    signer = self._signers.get(message.signer)
                    if signer is None:
                        message.reply.err(f"no vault key named {message.signer!r}", "bad_request")
                    else:
                        message.reply.ok(signer.sign(message.context + message.data).signature)
                case SignFeed():
                    if len(message.items) > _THREAD_THRESHOLD:
                        signed = await trio.to_thread.run_sync(self._sign_feed, message)
                    else:
                        signed = self._sign_feed(message)
                    message.reply.ok(signed)
                case DeriveKey():
                    if message.purpose.split(":")[0] in self._signers:
                        # The seeds of the vault's own signing keys never leave it.
                        message.reply.err("that key stays in the vault", "bad_request")
                    else:
                        message.reply.ok(derived_key(self._seed, message.purpose))
                case Whoami():
                    message.reply.ok(
                        Identity(
                            self._public.hex(),
                            self._public,
                            self._device_id,
                            bytes(self._signers[STORAGE_OWNER].verify_key),
                            bytes(self._signers[STORAGE_NODE].verify_key),
                        )
                    )
                case _:
                    assert_never(message)

    def _seal(self, message: Seal) -> None:
        try:
            sealed = seal_memory(
                message.memory,
                signing_key=self._signing_key,
                master_key=self._master_key,
                device_id=self._device_id,
            )
        except DmgnError as error:
            message.reply.err(str(error), error.code)
            return
        message.reply.ok(sealed)

    def _seal_all(self, memories: tuple[Memory, ...]) -> list[tuple[str, bytes] | SealFailed]:
        results: list[tuple[str, bytes] | SealFailed] = []
        for memory in memories:
            try:
                results.append(
                    seal_memory(
                        memory,
                        signing_key=self._signing_key,
                        master_key=self._master_key,
                        device_id=self._device_id,
                    )
                )
            except DmgnError as error:
                results.append(SealFailed(str(error), error.code))
        return results

    def _sign_feed(self, message: SignFeed) -> list[FeedEntry | Err]:
        head: FeedEntry | FeedHead | None = message.head
        results: list[FeedEntry | Err] = []
        for at, op in message.items:
            try:
                unsigned = UnsignedEntry.after(head, message.device_id, at, op)
                payload = FEED_ENTRY_CONTEXT + unsigned.signing_payload()
                entry = unsigned.signed(self._signing_key.sign(payload).signature)
            except FeedError as error:
                results.append(Err(str(error), error.code))
                continue
            results.append(entry)
            head = entry
        return results

    async def _open(self, message: Open) -> None:
        if len(message.envelopes) > _THREAD_THRESHOLD:
            results = await trio.to_thread.run_sync(self._open_all, message.envelopes)
        else:
            results = self._open_all(message.envelopes)
        message.reply.ok(results)

    def _open_all(self, envelopes: tuple[tuple[str, bytes], ...]) -> list[Opened | OpenFailed]:
        results: list[Opened | OpenFailed] = []
        for memory_id, envelope in envelopes:
            try:
                header, memory = open_memory(
                    envelope,
                    master_key=self._master_key,
                    expected_author=self._public,
                    expected_id=memory_id,
                )
            except DmgnError as error:
                results.append(OpenFailed(memory_id, str(error)))
            else:
                results.append(Opened(header, memory))
        return results
