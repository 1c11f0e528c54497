"""Asking a storage-mode peer, inside its authenticated session, whether it is one of our devices.

A bootstrap or added address that answered only in storage mode may still be one of our own
devices (its device handshake failed once, or someone on the path forged a refusal of it:
the close code before a handshake ends is not authenticated). The peering actor used to find
out by dialing it again in device mode now and then: a whole new connection and two Noise
messages each time, refused by nearly every such address (another identity's storage node).
In the 100-node sim hour those probes were half of all connections opened and a seventh of
the run's CPU.

This asks over the storage session that is already open instead: ``own.ask`` carries a random
nonce; the other end answers ``own.tag``, a MAC of the session's handshake hash, the nonce
and its own role in the handshake, keyed with its device PSK (`wire.DeviceCredentials.psk`,
which only the devices of one identity hold). We compare it with the tag our own PSK gives:
equal means the other end holds our PSK, and only then is the device handshake dialed.

What each side learns: the asker, whether the other end holds the asker's PSK (what the
device-mode dial told it, no more); the answerer, nothing (the nonce is random, the tag its
own). The handshake hash binds the tag to this session, so a tag cannot be relayed from a
session with one of our devices; the answerer's role byte means a tag we computed for a
question asked of us is never the answer we wait for (a peer that reflects our question
back gets a tag for the other role).
"""

from __future__ import annotations

import hashlib
import hmac
import os

from wire import Bytes, Message, MessageType

__all__ = [
    "OWN_ASK",
    "OWN_PROBE_TYPES",
    "OWN_TAG",
    "answer",
    "ask",
    "is_ours",
    "own_tag",
]

NONCE_BYTES = 16
TAG_BYTES = 32
_PERSON = b"dmgn own probe 1"  # BLAKE2b personalisation: 16 bytes

OWN_ASK = MessageType("own.ask", {"nonce": Bytes(NONCE_BYTES, NONCE_BYTES)})
OWN_TAG = MessageType(
    "own.tag", {"nonce": Bytes(NONCE_BYTES, NONCE_BYTES), "tag": Bytes(TAG_BYTES, TAG_BYTES)}
)
OWN_PROBE_TYPES = (OWN_ASK, OWN_TAG)


def own_tag(psk: bytes, handshake_hash: bytes, nonce: bytes, answerer_initiated: bool) -> bytes:
    """The answer a holder of ``psk`` gives to ``nonce`` in the session of ``handshake_hash``,
    when it is the side that dialed (``answerer_initiated``) or the side that was dialed."""
    role = b"\x01" if answerer_initiated else b"\x00"
    return hashlib.blake2b(
        handshake_hash + nonce + role, key=psk, digest_size=TAG_BYTES, person=_PERSON
    ).digest()


def ask() -> Message:
    """A fresh question (its nonce from the OS's random source)."""
    return OWN_ASK(nonce=os.urandom(NONCE_BYTES))


def answer(question: Message, psk: bytes | None, handshake_hash: bytes, initiated: bool) -> Message:
    """Our ``own.tag`` for ``question``; a node without a PSK answers random bytes (it has no
    devices to be one of, and an answer at once spares the asker its timeout)."""
    nonce = question.get_bytes("nonce")
    tag = os.urandom(TAG_BYTES) if psk is None else own_tag(psk, handshake_hash, nonce, initiated)
    return OWN_TAG(nonce=nonce, tag=tag)


def is_ours(
    question: Message, reply: Message, psk: bytes, handshake_hash: bytes, we_initiated: bool
) -> bool:
    """Whether ``reply`` proves that the other end of the session holds ``psk``."""
    nonce = question.get_bytes("nonce")
    expected = own_tag(psk, handshake_hash, nonce, answerer_initiated=not we_initiated)
    return reply.get_bytes("nonce") == nonce and hmac.compare_digest(
        reply.get_bytes("tag"), expected
    )
