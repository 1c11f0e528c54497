"""Wire schemas of the storage protocol: what a node asks of another identity's storage service.

A device (its shard keeper) sends requests to storage peers; each request carries a request id
``rid`` and is answered by one ``storage.reply`` with the same id. Requests always name the
``owner`` whose objects they concern: the identity's *storage-owner key* (derived from the seed
for this purpose only, so it is not the identity key and two identities' owner keys link to
nothing; issue 20). Storage peers only ever see our per-node storage key in the handshake, so
each request also carries ``proof``: the owner key's signature over `OWNER_PROOF_CONTEXT` and
the storage key of the peer it is sent to (`owner_proof_message`). The service refuses an owner
whose proof does not verify for its own storage key (so a node asking for another owner's data
gets a reason, not data, and a proof one storage peer received is worthless at any other).
Every field is bounded here, so a flood of oversized requests dies in the decoder.

==================  =========================================  ===============================
request             fields                                     reply carries
==================  =========================================  ===============================
storage.put         owner, oids[], blobs[]                      used (bytes held for the owner)
storage.get         owner, oids[]                               oids[], blobs[] (those held)
storage.audit       owner, oids[], nonce                        oids[], proofs[] (sha256(nonce
                                                                || blob) for those held)
storage.delete      owner, oids[], at, sig (owner's signature)  count
mail.push           owner, stream, first, items[]               used
mail.heads          owner, watch (optional)                     streams[], seqs[], watch
mail.pull           owner, stream, first, last                  items[] (from ``first`` on)
==================  =========================================  ===============================

A push carries at most `MAX_BATCH_BYTES` of items, each at most `MAX_MAIL_ITEM_BYTES` (512 KiB;
the schema bounds each item and the count, the service the sum: ``bad_request``), and a get or
pull answer carries at most `MAX_BATCH_BYTES` (the first object or item alone may exceed it).

Every request also carries ``proof`` (64 bytes, above). A refused request is answered with
``code`` (``refused``, ``quota``, ``rate``, ``bad_request``) and a one-line ``reason``.

Peer exchange (``peers.exchange`` → ``peers.offers``, below) tells a node of other storage
nodes; it names no owner and is not a storage request.

One message goes the other way unasked: ``mail.notify`` (owner, stream, seq), sent to a
connection that asked for heads with ``watch`` = 1 when another peer pushes entries for that
owner (the reply's ``watch`` says for how many seconds the service keeps watching; 0 or absent:
not at all). A keeper then pulls at once, and asks a watching peer for heads only now and then:
without it, every device asked each storage peer for heads every sync round, and those asks
and their answers were over half of all messages in a sim hour. A notice is a hint, never
data: the pull that follows is checked as any other.
"""

from __future__ import annotations

from dmgn.shards import MAX_MAIL_ITEM_BYTES, MAX_SHARD_BYTES, SHARD_ID_BYTES, STREAM_ID_BYTES
from dmgn.storage_offer import MAX_OFFER_BYTES
from wire import Bytes, Int, ListOf, Message, MessageType, Str

__all__ = [
    "AUDIT",
    "DELETE",
    "EXCHANGE_TYPES",
    "GET",
    "MAIL_HEADS",
    "MAIL_NOTIFY",
    "MAIL_PULL",
    "MAIL_PUSH",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_OBJECTS",
    "MAX_EXCHANGE_OFFERS",
    "MAX_MAIL_BATCH",
    "OWNER_PROOF_CONTEXT",
    "PEERS_EXCHANGE",
    "PEERS_OFFERS",
    "PUT",
    "REPLY",
    "REQUEST_TYPES",
    "STORAGE_MESSAGE_TYPES",
    "owner_proof_message",
    "reply_fields",
]

#: Objects named in one request. 256 ids are 8 KiB; answers to a get are capped in bytes too.
MAX_BATCH_OBJECTS = 256
#: Payload bytes of one put or mail.push, and of one get or mail.pull answer: what one request
#: may make a storage service load (it reads sizes first, then only the blobs that fit). Large
#: enough that a batch of text shards is one message; a 768 KiB batch of 272-byte shards is
#: the 256 ids a request may name. Well under the transport's 4 MiB cap on a stranger's message.
MAX_BATCH_BYTES = 768 * 1024
#: Mailbox items per push or pull: the keeper's thin items are 256 or 512 bytes, so 256 of them
#: are at most 128 KiB; whole items (up to `MAX_MAIL_ITEM_BYTES`) are bounded by the bytes.
MAX_MAIL_BATCH = 256
#: Streams (devices) per identity a mailbox answers for.
MAX_STREAMS = 256
MAX_SEQ = 2**62
MAX_RID = 2**32
#: Offers in one peer-exchange answer: a device wanting 8 storage peers learns of twice that
#: from one answer, at ~4 KiB.
MAX_EXCHANGE_OFFERS = 16
#: Longest watch a service may promise (a day); it says how long in each heads answer.
MAX_WATCH_SECONDS = 86400

#: Domain separation: an owner proof is never a signature over anything else.
OWNER_PROOF_CONTEXT = b"dmgn-storage-owner-proof:"

_RID = Int(0, MAX_RID)
_OWNER = Bytes(32, 32)
_PROOF = Bytes(64, 64)
_OID = Bytes(SHARD_ID_BYTES, SHARD_ID_BYTES)
_OIDS = ListOf(_OID, MAX_BATCH_OBJECTS, 1)
_STREAM = Bytes(STREAM_ID_BYTES, STREAM_ID_BYTES)

PUT = MessageType(
    "storage.put",
    {
        "rid": _RID,
        "owner": _OWNER,
        "proof": _PROOF,
        "oids": _OIDS,
        "blobs": ListOf(Bytes(MAX_SHARD_BYTES, 1), MAX_BATCH_OBJECTS, 1),
    },
)
GET = MessageType("storage.get", {"rid": _RID, "owner": _OWNER, "proof": _PROOF, "oids": _OIDS})
AUDIT = MessageType(
    "storage.audit",
    {"rid": _RID, "owner": _OWNER, "proof": _PROOF, "oids": _OIDS, "nonce": Bytes(32, 16)},
)
DELETE = MessageType(
    "storage.delete",
    {
        "rid": _RID,
        "owner": _OWNER,
        "proof": _PROOF,
        "oids": _OIDS,
        "at": Int(0, 2**63),
        "sig": Bytes(64, 64),
    },
)
MAIL_PUSH = MessageType(
    "mail.push",
    {
        "rid": _RID,
        "owner": _OWNER,
        "proof": _PROOF,
        "stream": _STREAM,
        "first": Int(1, MAX_SEQ),
        "items": ListOf(Bytes(MAX_MAIL_ITEM_BYTES, 1), MAX_MAIL_BATCH, 1),
    },
)
MAIL_HEADS = MessageType(
    "mail.heads",
    {"rid": _RID, "owner": _OWNER, "proof": _PROOF, "watch": Int(0, 1)},
    optional=frozenset({"watch"}),
)
MAIL_PULL = MessageType(
    "mail.pull",
    {
        "rid": _RID,
        "owner": _OWNER,
        "proof": _PROOF,
        "stream": _STREAM,
        "first": Int(1, MAX_SEQ),
        "last": Int(1, MAX_SEQ),
    },
)
REPLY = MessageType(
    "storage.reply",
    {
        "rid": _RID,
        "code": Str(32),  # "" = ok
        "reason": Str(512),
        "used": Int(0, 2**63),
        "count": Int(0, 2**32),
        "oids": ListOf(_OID, MAX_BATCH_OBJECTS),
        "blobs": ListOf(Bytes(MAX_SHARD_BYTES, 1), MAX_BATCH_OBJECTS),
        "proofs": ListOf(Bytes(32, 32), MAX_BATCH_OBJECTS),
        "streams": ListOf(_STREAM, MAX_STREAMS),
        "seqs": ListOf(Int(0, MAX_SEQ), MAX_STREAMS),
        "items": ListOf(Bytes(MAX_MAIL_ITEM_BYTES, 1), MAX_MAIL_BATCH),
        "watch": Int(0, MAX_WATCH_SECONDS),
    },
    optional=frozenset(
        {"used", "count", "oids", "blobs", "proofs", "streams", "seqs", "items", "watch"}
    ),
)
#: Unasked, from a storage service to a connection watching ``owner``'s mailbox: ``stream``
#: now holds entries up to ``seq`` there.
MAIL_NOTIFY = MessageType(
    "mail.notify", {"owner": _OWNER, "stream": _STREAM, "seq": Int(1, MAX_SEQ)}
)
#: Peer exchange (not a storage request: no owner, no reply id). A node asks a storage peer it
#: chose which storage nodes it knows, giving its own signed offer (none if it holds nothing
#: for others); the answer carries up to `MAX_EXCHANGE_OFFERS` offers, each signed by the node
#: it describes (:mod:`dmgn.storage_offer`), so the answerer can leave some out but forge none.
PEERS_EXCHANGE = MessageType("peers.exchange", {"offers": ListOf(Bytes(MAX_OFFER_BYTES, 1), 1)})
PEERS_OFFERS = MessageType(
    "peers.offers", {"offers": ListOf(Bytes(MAX_OFFER_BYTES, 1), MAX_EXCHANGE_OFFERS)}
)
EXCHANGE_TYPES = (PEERS_EXCHANGE, PEERS_OFFERS)
REQUEST_TYPES = (PUT, GET, AUDIT, DELETE, MAIL_PUSH, MAIL_HEADS, MAIL_PULL)
STORAGE_MESSAGE_TYPES = (*REQUEST_TYPES, REPLY, MAIL_NOTIFY, *EXCHANGE_TYPES)
REQUEST_NAMES = frozenset(t.name for t in REQUEST_TYPES)


def owner_proof_message(storage_key: bytes) -> bytes:
    """What the owner key signs (after `OWNER_PROOF_CONTEXT`) to use the storage peer whose
    handshake showed ``storage_key``."""
    return storage_key


def reply_fields(message: Message) -> tuple[str, str]:
    """``(code, reason)`` of a reply; code ``""`` means the request was served."""
    return message.get_str("code"), message.get_str("reason")
