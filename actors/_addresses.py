"""This machine's addresses that other nodes can dial."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from urllib.parse import urlsplit

__all__ = [
    "reachable_addresses",
]


def reachable_addresses(bound: str) -> tuple[str, ...]:
    """Addresses other nodes can dial for a listener bound at ``bound``.

    A wildcard host (``0.0.0.0``) is replaced by this machine's primary IPv4 address (the one
    its default route uses; found without sending anything) and loopback.
    """
    parts = urlsplit(bound)
    host = parts.hostname or ""
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return (bound,)
    if not unspecified or parts.port is None:
        return (bound,)
    hosts: list[str] = []
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: UDP connect only picks a route
        primary = probe.getsockname()[0]
        if primary and not primary.startswith("127."):
            hosts.append(primary)
    hosts.append("127.0.0.1")
    return tuple(f"{parts.scheme}://{h}:{parts.port}" for h in hosts)
