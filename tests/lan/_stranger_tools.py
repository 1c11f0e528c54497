"""Run inside the stranger's network namespace by lan_scenario.py (not a test module).

``capture FILE``: append every mDNS datagram seen on 224.0.0.251:5353 to FILE (length-prefixed)
until killed: a Python socket, no tcpdump. ``dial ADDR...``: dial each address as a stranger,
once in device mode and once in storage mode (held open for `HOLD` seconds, recording every
application message it receives: a leak after the handshake shows there), and ask the local
DHT node (our own namespace's dmgn) which nodes it knows; print one JSON line of what came
back.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import sys
from typing import Any

import trio

MDNS_GROUP, MDNS_PORT = "224.0.0.251", 5353
#: How long a storage-mode dial stays open, reading: the owner key reached a stranger within
#: a second of connecting before the review of issue 20 item 3.
HOLD = 4.0


def capture(path: str, interface: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("", MDNS_PORT))
    membership = socket.inet_aton(MDNS_GROUP) + socket.inet_aton(interface)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    with open(path, "ab", buffering=0) as out:
        print("capturing", flush=True)
        while True:
            data, _ = sock.recvfrom(65535)
            out.write(struct.pack(">I", len(data)) + data)


def _plain(value: Any) -> Any:
    """A received field as JSON: bytes as hex, containers recursively."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


async def _dial(address: str, mode_name: str) -> dict[str, Any]:
    from actors.node import DEVICE_REGISTRY
    from wire import Mode, Suite, WireError, secure_connection
    from wire.testing import TestIdentity
    from wire.websocket import WebSocketNetwork

    mode = Mode.DEVICE if mode_name == "device" else Mode.STORAGE
    try:
        with trio.fail_after(15 + HOLD):
            async with WebSocketNetwork().dial(address) as stream:
                connection = await secure_connection(
                    stream,
                    TestIdentity.generate().new_device(),
                    initiator=True,
                    mode=mode,
                    # The suite every node takes: what this probes is the mode, and a node
                    # measured without fast AES (a busy start-up) refuses AES-GCM first.
                    suite=Suite.CHACHAPOLY,
                    registry=DEVICE_REGISTRY,
                )
                peer = connection.peer
                received: list[dict[str, Any]] = []
                ended = f"still open after {HOLD:g}s"
                opened = trio.current_time()
                with trio.move_on_after(HOLD):
                    try:
                        while True:
                            message = await connection.receive()
                            received.append({"t": message.type, **_plain(dict(message.fields))})
                    except WireError as error:  # they closed: recorded
                        ended = f"{type(error).__name__}: {error}"
                held = trio.current_time() - opened
                await connection.aclose(1000, "bye")
                return {
                    "ok": True,
                    "identity": peer.identity_public_key.hex(),
                    "device": peer.device_id.hex(),
                    "noise": peer.noise_static_public_key.hex(),
                    "received": received,
                    "held_s": round(held, 2),
                    "ended": ended,
                }
    except Exception as error:  # reported: what the stranger got is the point
        return {"ok": False, "error": f"{type(error).__name__}: {error}"}


def _dht_known(host: str, port: int) -> list[list[Any]]:
    from kademlia.network import Server

    async def ask() -> list[list[Any]]:
        server = Server()
        await server.listen(port + 1000, interface=host)
        try:
            await server.bootstrap([(host, port)])
            return [
                [n.id.hex(), n.ip, n.port]
                for n in server.protocol.router.find_neighbors(server.node, k=100)
            ]
        finally:
            server.stop()

    return asyncio.run(ask())


def dial(addresses: list[str], dht_host: str, dht_port: int) -> None:
    async def everything() -> dict[str, Any]:
        # Every (address, mode) dial at once: each storage-mode one is held open HOLD seconds.
        dials: dict[str, dict[str, Any]] = {address: {} for address in addresses}

        async def one(address: str, mode: str) -> None:
            dials[address][mode] = await _dial(address, mode)

        async with trio.open_nursery() as nursery:
            for address in addresses:
                for mode in ("device", "storage"):
                    nursery.start_soon(one, address, mode)
        return dials

    result: dict[str, Any] = {"dials": trio.run(everything)}
    try:
        result["dht_known"] = _dht_known(dht_host, dht_port)
    except Exception as error:  # reported
        result["dht_error"] = f"{type(error).__name__}: {error}"
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1] == "capture":
        capture(sys.argv[2], sys.argv[3])
    else:
        dial(sys.argv[4:], sys.argv[2], int(sys.argv[3]))
