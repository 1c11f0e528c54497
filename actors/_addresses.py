"""This machine's addresses that other nodes can dial, read from its interfaces (``ifaddr``).

Not from the route table: a LAN without a default route (an offline LAN, a lab, a plane) has
no route to ask, and the answer used to be loopback only, which every peer then dialed and
reached itself (issue 20).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

import ifaddr

__all__ = [
    "interface_hosts",
    "local_addresses",
    "reachable_addresses",
]

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def interface_hosts() -> list[tuple[str, _IP]]:
    """(interface name, address) for every address of every interface, in interface order.

    IPv6 link-local addresses are left out: without a scope id (``%eth0``) nobody else can dial
    them, and a URL cannot carry one that means anything on the other machine.
    """
    hosts: list[tuple[str, _IP]] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            raw = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            try:
                address = ipaddress.ip_address(raw)
            except ValueError:
                continue
            if address.version == 6 and address.is_link_local:
                continue
            hosts.append((adapter.nice_name or adapter.name, address))
    return hosts


def _url(scheme: str, host: _IP, port: int) -> str:
    text = f"[{host}]" if host.version == 6 else str(host)
    return f"{scheme}://{text}:{port}"


def reachable_addresses(bound: str, hosts: list[tuple[str, _IP]] | None = None) -> tuple[str, ...]:
    """Addresses other nodes can dial for a listener bound at ``bound``.

    A wildcard host is replaced by every non-loopback address of this machine's interfaces of
    the listener's family (``0.0.0.0``: IPv4; ``::``: IPv6, and IPv4 too unless the listener is
    IPv6-only, which trio's is: so IPv6 only), and by loopback only when there is nothing else
    (a machine with no network, where only its own processes can connect). A concrete host is
    itself. ``hosts`` replaces the interface list (tests).
    """
    parts = urlsplit(bound)
    host = parts.hostname or ""
    try:
        wildcard = ipaddress.ip_address(host)
    except ValueError:
        return (bound,)
    if not wildcard.is_unspecified or parts.port is None:
        return (bound,)
    found = interface_hosts() if hosts is None else hosts
    same_family = [a for _, a in found if a.version == wildcard.version]
    routable = [a for a in same_family if not a.is_loopback]
    chosen = routable or [a for a in same_family if a.is_loopback]
    if not chosen:
        chosen = [ipaddress.ip_address("127.0.0.1" if wildcard.version == 4 else "::1")]
    unique = list(dict.fromkeys(chosen))
    return tuple(_url(parts.scheme, a, parts.port) for a in unique)


def local_addresses(bound: str, hosts: list[tuple[str, _IP]] | None = None) -> frozenset[str]:
    """Every address at which a dial would reach this listener, loopback included: a found
    address in this set is ourselves and is never dialed."""
    parts = urlsplit(bound)
    if parts.port is None:
        return frozenset({bound})
    found = interface_hosts() if hosts is None else hosts
    own = {bound}
    try:
        listening = ipaddress.ip_address(parts.hostname or "")
    except ValueError:
        return frozenset(own)
    for _, address in found:
        if listening.is_unspecified or address == listening:
            own.add(_url(parts.scheme, address, parts.port))
    return frozenset(own)
