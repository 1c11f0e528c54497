"""A storage offer: a node saying, under its storage key, where it listens to hold shards.

Every node with a storage quota can hold other identities' shards and mailboxes, but a device
that knows one bootstrap address must learn of the others before it can spread anything over
them. Nodes tell each other of the storage nodes they know (peer exchange, ``peers.exchange``
in :mod:`dmgn.storage_protocol`), and what they pass on is this record, signed by the
offering node itself, so a relay can drop offers but never forge one or move one to another
address:

    body  [version, "offer", storage_key, device_id, addrs, issued_at, expires_at]
    signature = ed25519(storage_key, OFFER_CONTEXT || msgpack(body));  bytes = msgpack(body + [sig])

The storage key is the per-node key a node shows strangers in storage-mode handshakes (the
vault's ``storage-node`` key, unlinkable to the identity), so an offer says no more about its
node than a storage handshake with it does; and a dial of an offer expects exactly that key, so
a forged address answers with another key and the dial fails. Offers expire (`OFFER_LIFETIME`,
at most a day): a node that moved or stopped offering fades out of everyone's tables.

A relay *can* invent offers for keys it made up (a Sybil): who may hold our shards is bounded
elsewhere (the candidate table's per-prefix admission and the keeper's one-shard-per-prefix
placement; docs/security.md).

`address_prefix` names the network an address is in (an IPv4 /24, an IPv6 /48, or the host
name), the unit by which those bounds count.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from dmgn.errors import DmgnError

__all__ = [
    "MAX_OFFER_ADDRS",
    "MAX_OFFER_BYTES",
    "OFFER_CONTEXT",
    "OFFER_LIFETIME",
    "OfferError",
    "StorageOffer",
    "address_prefix",
    "decode_storage_offer",
]

OFFER_VERSION = 1
#: Domain separation: an offer's signature is never a signature over anything else.
OFFER_CONTEXT = b"dmgn-storage-offer-v1:"
#: How long an offer is signed for; a node signs a fresh one well before (a third of this).
OFFER_LIFETIME = 6 * 3600
#: Longest validity an offer may claim, and how far in the future it may start (clock skew).
MAX_OFFER_LIFETIME = 24 * 3600
MAX_CLOCK_SKEW = 60
MAX_OFFER_ADDRS = 4
MAX_ADDR_CHARS = 200
#: An encoded offer is ~200 bytes with one address; four long addresses stay under this.
MAX_OFFER_BYTES = 1024
#: Schemes an offer may name: WebSocket, and ``mem`` (the in-process network of ``sims/``,
#: where a real node's dial of it simply fails).
_SCHEMES = ("ws", "wss", "mem")
_KIND = "offer"


class OfferError(DmgnError):
    """A storage offer that is malformed, unsigned, forged or expired (it is ignored)."""

    code = "bad_record"


def _check_addr(addr: object) -> str:
    if not isinstance(addr, str) or not 0 < len(addr) <= MAX_ADDR_CHARS:
        raise OfferError("storage offer: bad address")
    parts = urlsplit(addr)
    try:
        port = parts.port
    except ValueError:
        raise OfferError(f"storage offer: {addr[:60]!r} has a bad port") from None
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise OfferError(f"storage offer: {addr[:60]!r} is not a ws:// address")
    if parts.scheme != "mem" and port is None:
        raise OfferError(f"storage offer: {addr[:60]!r} has no port")
    return addr


def _pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _no_extension(code: int, data: bytes) -> object:
    raise OfferError("storage offer: msgpack extension types are not allowed")


@dataclass(frozen=True, slots=True)
class StorageOffer:
    """Where a storage node listens, signed by the storage key it shows in handshakes."""

    storage_key: bytes
    device_id: bytes
    addrs: tuple[str, ...]
    issued_at: int
    expires_at: int
    signature: bytes = b""

    def __post_init__(self) -> None:
        if not (
            isinstance(self.storage_key, bytes)
            and len(self.storage_key) == 32
            and isinstance(self.device_id, bytes)
            and len(self.device_id) == 16
            and isinstance(self.signature, bytes)
            and len(self.signature) in (0, 64)
        ):
            raise OfferError("storage offer: bad key, id or signature length")
        if not isinstance(self.addrs, tuple) or not 1 <= len(self.addrs) <= MAX_OFFER_ADDRS:
            raise OfferError(f"storage offer: needs 1-{MAX_OFFER_ADDRS} addresses")
        for addr in self.addrs:
            _check_addr(addr)
        if not (
            type(self.issued_at) is int
            and type(self.expires_at) is int
            and 0 < self.issued_at < self.expires_at <= self.issued_at + MAX_OFFER_LIFETIME
        ):
            raise OfferError("storage offer: bad validity period")

    def _body(self) -> list[Any]:
        return [
            OFFER_VERSION,
            _KIND,
            self.storage_key,
            self.device_id,
            list(self.addrs),
            self.issued_at,
            self.expires_at,
        ]

    def signing_payload(self) -> bytes:
        """What the vault signs (after `OFFER_CONTEXT`) with the node's storage key."""
        return _pack(self._body())

    def signed(self, signature: bytes) -> StorageOffer:
        offer = replace(self, signature=signature)
        if len(offer.encode()) > MAX_OFFER_BYTES:
            raise OfferError("storage offer is too large; offer fewer addresses")
        return offer

    def encode(self) -> bytes:
        if not self.signature:
            raise OfferError("storage offer is not signed")
        return _pack([*self._body(), self.signature])

    def verify(self, now: int) -> None:
        """Signed by ``storage_key`` and valid at ``now`` (seconds since the epoch)."""
        if self.issued_at > now + MAX_CLOCK_SKEW:
            raise OfferError("storage offer: issued in the future")
        if self.expires_at <= now:
            raise OfferError("storage offer: expired")
        try:
            VerifyKey(self.storage_key).verify(
                OFFER_CONTEXT + self.signing_payload(), self.signature
            )
        except (BadSignatureError, ValueError, TypeError):
            raise OfferError("storage offer: signature does not verify") from None


def decode_storage_offer(data: bytes, *, now: int) -> StorageOffer:
    """Parse and verify an offer a peer sent; `OfferError` says why one is refused."""
    if not isinstance(data, bytes) or len(data) > MAX_OFFER_BYTES:
        raise OfferError("storage offer: not bytes, or too large")
    try:
        raw = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_map_len=0,
            max_array_len=16,
            ext_hook=_no_extension,
        )
    except OfferError:
        raise
    except Exception:  # msgpack reports malformed input with many exception types
        raise OfferError("storage offer: not valid msgpack") from None
    if not isinstance(raw, list) or len(raw) != 8 or raw[0] != OFFER_VERSION or raw[1] != _KIND:
        raise OfferError("storage offer: wrong shape or version")
    _, _, storage_key, device_id, addrs, issued_at, expires_at, signature = raw
    if not isinstance(addrs, list):
        raise OfferError("storage offer: addresses are not a list")
    offer = StorageOffer(storage_key, device_id, tuple(addrs), issued_at, expires_at, signature)
    if len(signature) != 64:
        raise OfferError("storage offer is not signed")
    if offer.encode() != data:
        raise OfferError("storage offer: not canonically encoded")
    offer.verify(now)
    return offer


def address_prefix(addr: str) -> str:
    """The network ``addr`` is in, for counting how many candidates share one: an IPv4
    address's /24, an IPv6 address's /48, or else the host name itself (a name may resolve
    anywhere, so each counts as its own network)."""
    try:
        host = urlsplit(addr).hostname or addr
    except ValueError:
        return addr
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host.lower()
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ipaddress.ip_network(f"{ip}/24", strict=False))
    if ip.ipv4_mapped is not None:
        return str(ipaddress.ip_network(f"{ip.ipv4_mapped}/24", strict=False))
    return str(ipaddress.ip_network(f"{ip}/48", strict=False))
