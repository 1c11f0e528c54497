"""`python -m wire`: the demo, and listen/dial as docs/wire.md gives them, as real processes."""

from __future__ import annotations

import re
import shlex
import socket
import subprocess
import sys

import pytest

from wire.__main__ import main


def test_demo_authenticates_echoes_and_refuses_the_wrong_identity(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "sent 'hello', echoed 'hello'" in out
    assert "1 MiB round trip" in out
    assert "refused as expected: peer is a different identity" in out


def _wire(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wire", *args], capture_output=True, text=True, timeout=timeout
    )


def test_the_dial_command_listen_prints_works_and_both_ends_show_one_handshake_hash() -> None:
    listener = subprocess.Popen(
        [sys.executable, "-u", "-m", "wire", "listen", "ws://127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert listener.stdout is not None
        lines: list[str] = []
        while not lines or not lines[-1].startswith("dial with: "):
            line = listener.stdout.readline()
            assert line, listener.stderr.read() if listener.stderr else "listener exited"
            lines.append(line.strip())
        command = shlex.split(lines[-1].removeprefix("dial with: "))
        assert command[:3] == ["python", "-m", "wire"] and command[-1] == "hello"
        dialed = _wire(*command[3:], "world")
        assert dialed.returncode == 0, dialed.stderr
        assert "sent 'hello', echoed 'hello'" in dialed.stdout
        assert "sent 'world', echoed 'world'" in dialed.stdout
        hashes = re.findall(r"handshake hash ([0-9a-f]{64})", dialed.stdout)
        assert len(hashes) == 1
        # The listener prints the same hash for its side of the session.
        while True:
            line = listener.stdout.readline()
            assert line, "listener exited before reporting the session"
            if "handshake hash" in line:
                assert hashes[0] in line
                break
    finally:
        listener.kill()
        listener.wait()


def test_a_bad_expect_is_a_one_line_error_not_a_traceback() -> None:
    done = _wire("dial", "ws://127.0.0.1:1", "--expect", "zz", "hello")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "'zz' is not an identity: give the 64 hex digits" in done.stderr


def test_a_refused_dial_says_why() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = _wire("dial", f"ws://127.0.0.1:{port}", "hello")
    assert done.returncode == 1
    line = done.stderr.strip()
    assert line.startswith(f"error: cannot connect to ws://127.0.0.1:{port}: ")
    assert line.endswith("Connection refused") and "\n" not in line


async def test_the_dial_command_falls_back_to_chachapoly_when_the_listener_refuses_aes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two machines (or two processes measured at a busy moment) may choose differently: the
    dialer prefers AES-GCM, the listener takes only ChaChaPoly and refuses with 4002; the
    command dials again in ChaChaPoly, as the transport does (it failed before)."""
    import trio

    import wire.__main__ as cli
    from wire import _secure_channel
    from wire._secure_channel import Suite
    from wire.testing import TestIdentity
    from wire.websocket import WebSocketNetwork

    monkeypatch.setattr(_secure_channel, "preferred_suite", lambda: Suite.AESGCM)
    monkeypatch.setattr(_secure_channel, "default_suites", lambda: (Suite.CHACHAPOLY,))
    listener = TestIdentity.generate().new_device()
    suites: list[Suite] = []

    async def handle(stream: cli.MessageStream) -> None:
        try:
            connection = await cli.secure_connection(
                stream, listener, initiator=False, registry=cli.REGISTRY
            )
        except cli.WireError:
            return
        suites.append(connection.suite)
        await cli._echo(connection)

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(WebSocketNetwork().listen, "ws://127.0.0.1:0", handle)
        with trio.fail_after(30):
            await cli.dial(bound, TestIdentity.generate().new_device(), None, ["hi"])
        nursery.cancel_scope.cancel()
    assert suites == [Suite.CHACHAPOLY]
    assert "ChaChaPoly" in capsys.readouterr().out
