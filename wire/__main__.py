"""``python -m wire``: see the secure channel work, by hand, on one or two machines.

    python -m wire demo                       # listener + dialer in one process
    python -m wire listen ws://127.0.0.1:7788 # prints its identity, echoes messages
    python -m wire dial ws://127.0.0.1:7788 --expect <identity hex> hello world

Each run makes a throwaway identity (via `wire.testing`); a real node's
identity key stays in its vault. Output shows who is on the other end, the
handshake hash, and every message in both directions.
"""

from __future__ import annotations

import argparse
import sys
import time

import trio
import trio.testing

from wire._connection import SecureConnection, secure_connection
from wire._errors import ConnectionClosed, WireError
from wire._handshake import DeviceCredentials
from wire._messages import BASE_REGISTRY, Bytes, CloseCode, MessageType, Str
from wire._network import MessageStream
from wire._secure_channel import Suite, protocol_name
from wire.testing import TestIdentity
from wire.websocket import WebSocketNetwork

# A free-text message for this tool only; real message types are declared by their layers.
SAY = MessageType("demo.say", {"text": Str(4096)})
BLOB = MessageType("demo.blob", {"data": Bytes(16 * 1024 * 1024)})
REGISTRY = BASE_REGISTRY.extended(SAY, BLOB)


def _describe(credentials: DeviceCredentials) -> str:
    certificate = credentials.certificate
    return (
        f"identity {certificate.identity_public_key.hex()}\n"
        f"  device {certificate.device_id.hex()}  noise key "
        f"{certificate.noise_static_public_key.hex()[:16]}…"
    )


def _peer_line(connection: SecureConnection) -> str:
    return (
        f"authenticated {connection.remote_address}: identity "
        f"{connection.peer.identity_public_key.hex()[:16]}… device "
        f"{connection.peer.device_id.hex()}\n"
        f"  {protocol_name(connection.mode, connection.suite)}, handshake hash "
        f"{connection.handshake_hash.hex()} (the same on both ends)"
    )


def _identity_hex(text: str) -> bytes:
    """``--expect``: the 64 hex digits `listen` prints after "identity"."""
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an identity: give the 64 hex digits the listener printed after "
            "'identity'"
        )
    return key


async def _echo(connection: SecureConnection) -> None:
    try:
        while True:
            message = await connection.receive()
            if message.type == SAY.name:
                print(f"  <- {message.get_str('text')!r}", flush=True)
            else:
                print(f"  <- {message.type} ({len(message.get_bytes('data'))} bytes)", flush=True)
            await connection.send(message)
    except ConnectionClosed as closed:
        print(f"  connection ended: {closed}", flush=True)


async def listen(address: str, credentials: DeviceCredentials) -> None:
    network = WebSocketNetwork()

    async def handle(stream: MessageStream) -> None:
        try:
            connection = await secure_connection(
                stream, credentials, initiator=False, registry=REGISTRY
            )
        except WireError as error:
            print(f"refused {stream.remote_address}: {error}", flush=True)
            return
        print(_peer_line(connection), flush=True)
        await _echo(connection)

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(network.listen, address, handle)
        print(f"listening on {bound} as {_describe(credentials)}", flush=True)
        print(
            f"dial with: python -m wire dial {bound} --expect "
            f"{credentials.certificate.identity_public_key.hex()} hello",
            flush=True,
        )


async def dial(
    address: str, credentials: DeviceCredentials, expect: bytes | None, words: list[str]
) -> None:
    network = WebSocketNetwork()
    try:
        await _dial_in(network, address, credentials, expect, words, None)
    except ConnectionClosed as closed:
        if closed.code != CloseCode.SUITE_REFUSED:
            raise
        # A listener whose CPU is not fast at AES refuses AES-GCM: the suite every node takes
        # (what the transport does too).
        await _dial_in(network, address, credentials, expect, words, Suite.CHACHAPOLY)


async def _dial_in(
    network: WebSocketNetwork,
    address: str,
    credentials: DeviceCredentials,
    expect: bytes | None,
    words: list[str],
    suite: Suite | None,
) -> None:
    async with network.dial(address) as stream:
        started = time.perf_counter()
        connection = await secure_connection(
            stream,
            credentials,
            initiator=True,
            suite=suite,
            expected_identity=expect,
            registry=REGISTRY,
        )
        elapsed = (time.perf_counter() - started) * 1000
        print(f"{_peer_line(connection)} (handshake {elapsed:.1f} ms)", flush=True)
        for text in words or ["hello"]:
            await connection.send(SAY(text=text))
            echoed = await connection.receive()
            print(f"  sent {text!r}, echoed {echoed.get_str('text')!r}", flush=True)
        payload = bytes(1024 * 1024)
        started = time.perf_counter()
        await connection.send(BLOB(data=payload))
        echoed = await connection.receive()
        assert echoed.get_bytes("data") == payload
        elapsed = time.perf_counter() - started
        print(f"  1 MiB round trip in {elapsed * 1000:.1f} ms", flush=True)
        await connection.aclose(1000, "done")


async def demo() -> None:
    server = TestIdentity.generate().new_device()
    client = TestIdentity.generate().new_device()
    impostor = TestIdentity.generate()
    async with trio.open_nursery() as nursery:
        network = WebSocketNetwork()

        async def handle(stream: MessageStream) -> None:
            try:
                connection = await secure_connection(
                    stream, server, initiator=False, registry=REGISTRY
                )
            except WireError as error:
                print(f"[listener] refused: {error}", flush=True)
                return
            print(f"[listener] {_peer_line(connection)}", flush=True)
            await _echo(connection)

        bound = await nursery.start(network.listen, "ws://127.0.0.1:0", handle)
        print(f"[listener] {bound} as {_describe(server)}", flush=True)
        print("[dialer] pinning the listener's identity:", flush=True)
        await dial(bound, client, server.certificate.identity_public_key, ["hello", "world"])
        print("[dialer] now expecting a different identity:", flush=True)
        try:
            await dial(bound, client, impostor.public_key, ["never sent"])
        except WireError as error:
            print(f"[dialer] refused as expected: {error}", flush=True)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wire", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="listener and dialer in one process, on loopback")
    listen_cmd = commands.add_parser("listen", help="accept connections and echo messages")
    listen_cmd.add_argument("address", help="ws://host:port (port 0 picks one)")
    dial_cmd = commands.add_parser("dial", help="connect, send words, report timings")
    dial_cmd.add_argument("address")
    dial_cmd.add_argument(
        "--expect", type=_identity_hex, help="identity public key (hex) the peer must have"
    )
    dial_cmd.add_argument("words", nargs="*", help="messages to send (default: hello)")
    # `dial ADDRESS --expect KEY hello world` (as `listen` prints it) puts the words after the
    # option, where argparse no longer matches them to `words` (it filled that, empty, before
    # the option); with subcommands intermixed parsing is unavailable, so take them back here.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "dial" or any(word.startswith("-") for word in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.words = [*args.words, *extra]
    credentials = TestIdentity.generate().new_device()
    try:
        if args.command == "demo":
            trio.run(demo)
        elif args.command == "listen":
            trio.run(listen, args.address, credentials)
        else:
            trio.run(dial, args.address, credentials, args.expect, args.words)
    except WireError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
