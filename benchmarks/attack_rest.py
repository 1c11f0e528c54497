"""Issue 30 against a real daemon's REST port: a connection flood without a token, and bad input.

    cd <checkout> && PYTHONPATH=$PWD .venv/bin/python <this file> --label before|after [--attack 60]

The code under test is whatever ``dmgn`` PYTHONPATH gives (this script imports none of it and
runs ``python -m dmgn.app.cli``), so the same script measures old and new checkouts. Writes
benchmarks/results/attack_rest.json (one entry per label, kept across runs) and .md (the labels
side by side) beside this script. Loopback only; about three minutes.

Setup: a fresh data dir, ``dmgn init``, REST on a free 127.0.0.1 port, mDNS off, the hashing
embedder; ``dmgn start`` runs with ``RLIMIT_NOFILE`` lowered to ``--nofile`` (1024, a common
default), which the daemon inherits.

1. Flood (item 7): this process opens ``--connections`` (1,100) TCP connections to the REST port
   at ``--ramp`` a second, that never send a byte, reopening each one the node closes, and
   keeps that up for ``--attack`` seconds after the last is opened.
   Measured: ``dmgn status`` (the whole CLI process) before and every 2 s during it; one
   authorised ``GET /v1/status`` and one WebSocket upgrade to the P2P port each round; the
   node's open descriptors; log lines per minute saying accept failed (EMFILE), and tracebacks.
2. A partial body (item 8d): headers with ``Content-Length: 100`` and 10 bytes of body, then
   silence; how long until the node answers or closes (waited for at most ``--partial-wait``).
3. JSON nested 5,000 deep (item 8c): the status code, and tracebacks logged for it.
4. Lone surrogates (item 3): ten ``POST /v1/memories`` with ``{"metadata": {"k": "\\udc00"}}``;
   the status codes, and whether the node still answers (the supervisor used to give up on the
   vault after six crashes a minute and stop the node).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

RESULTS = Path(__file__).resolve().parent / "results"
PASSPHRASE = "attack-rest-benchmark"
#: A 5,000-deep JSON array: deeper than Python's parser recurses (its limit is ~1,000).
DEEP_JSON = b"[" * 5000 + b"]" * 5000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Daemon:
    def __init__(self, root: Path, nofile: int) -> None:
        self.root = root
        self.nofile = nofile
        self.env = {
            **os.environ,
            "DMGN_DATA_DIR": str(root),
            "DMGN_PASSPHRASE": PASSPHRASE,
            "DMGN_EMBEDDER": "hashing",
        }
        self.pid = 0
        self.api_port = free_port()
        self.p2p_port = free_port()
        self.token = ""

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "dmgn.app.cli", *args, "--json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def json(self, *args: str) -> Any:
        done = self.cli(*args)
        if done.returncode != 0:
            raise RuntimeError(f"dmgn {' '.join(args)}: {done.stderr.strip()}")
        return json.loads(done.stdout)

    def _lower_nofile(self) -> None:  # runs in the child before exec: the daemon inherits it
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, min(hard, self.nofile)))

    def start(self) -> None:
        self.json("init")
        config = self.root / "config.json"
        document = json.loads(config.read_text())
        document.update(
            listen_addr=f"ws://127.0.0.1:{self.p2p_port}", mdns=False, api_port=self.api_port
        )
        config.write_text(json.dumps(document))
        self.token = self.json("token", "show")["token"]
        done = subprocess.run(
            [sys.executable, "-m", "dmgn.app.cli", "start", "--json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=self._lower_nofile,
        )
        if done.returncode != 0:
            raise RuntimeError(f"dmgn start: {done.stderr.strip()}")
        self.pid = int(json.loads(done.stdout)["pid"])

    def alive(self) -> bool:
        return Path(f"/proc/{self.pid}").exists()

    def nofile_limit(self) -> str:
        for line in Path(f"/proc/{self.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                return " ".join(line.split()[3:5])
        return "?"

    def open_fds(self) -> int:
        try:
            return len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            return -1

    def log_text(self) -> str:
        logs = sorted((self.root / "logs").glob("dmgn-node.log*"))
        return "".join(path.read_text(errors="replace") for path in logs)

    def status_seconds(self, timeout: float = 90) -> float | None:
        """Wall time of one `dmgn status` process; None if it failed or timed out."""
        t0 = time.monotonic()
        try:
            done = self.cli("status", timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return time.monotonic() - t0 if done.returncode == 0 else None

    def answers_as_daemon(self) -> bool:
        """`dmgn status` answered by the daemon (without one it reads the data dir itself)."""
        done = self.cli("status", timeout=30)
        return done.returncode == 0 and json.loads(done.stdout).get("mode") == "daemon"

    def kill(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)


def accept_failure_lines(text: str) -> int:
    # trio's serve_listeners: "accept returned EMFILE ..."; ours: "accept failed (EMFILE ...".
    return sum(
        1
        for line in text.splitlines()
        if ("accept returned" in line or "accept failed" in line)
        and ("EMFILE" in line or "ENFILE" in line)
    )


def tracebacks(text: str) -> int:
    # The log file holds JSON lines, a traceback inside one (escaped): count them wherever.
    return text.count("Traceback (most recent call last)")


class Flood:
    def __init__(self, port: int) -> None:
        self.port = port
        self.opened = 0
        self.closed_by_node = 0
        self.connect_timeouts = 0
        self.held = 0

    async def hold_one(self) -> None:
        while True:
            stream: trio.SocketStream | None = None
            with trio.move_on_after(5):
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    stream = None
            if stream is None:
                self.connect_timeouts += 1
                await trio.sleep(0.5)
                continue
            self.opened += 1
            self.held += 1
            try:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    while await stream.receive_some(4096):
                        pass
                self.closed_by_node += 1
            finally:
                self.held -= 1
                await stream.aclose()


async def rest_status(client: httpx.AsyncClient, token: str) -> float | None:
    t0 = time.monotonic()
    try:
        response = await client.get("/v1/status", headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError:
        return None
    return time.monotonic() - t0 if response.status_code == 200 else None


async def p2p_upgrade(port: int) -> float | None:
    """Time for the P2P listener to answer a WebSocket upgrade (its first reply bytes)."""
    t0 = time.monotonic()
    request = (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    with trio.move_on_after(30):
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(request)
                if await stream.receive_some(4096):
                    return time.monotonic() - t0
        except (OSError, trio.BrokenResourceError):
            return None
    return None


def summary(values: list[float | None]) -> dict[str, Any]:
    done = [v for v in values if v is not None]
    return {
        "n": len(values),
        "failed": len(values) - len(done),
        "median_s": round(statistics.median(done), 3) if done else None,
        "max_s": round(max(done), 3) if done else None,
    }


async def flood_phase(daemon: Daemon, args: argparse.Namespace) -> dict[str, Any]:
    flood = Flood(daemon.api_port)
    status: list[float | None] = []
    rest: list[float | None] = []
    p2p: list[float | None] = []
    fds: list[int] = []
    log_before = daemon.log_text()
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.api_port}", timeout=30) as client,
        trio.open_nursery() as nursery,
    ):
        # A ramp, not a burst: a burst overflows the listen backlog, and the kernel then
        # completes the handshake on our side only (the node sees those connections as the
        # SYN-ACKs are retried, seconds later), which hides how many a node would hold.
        for _ in range(args.connections):
            nursery.start_soon(flood.hold_one)
            await trio.sleep(1 / args.ramp)
        started = time.monotonic()
        connected_at_full = flood.held
        while time.monotonic() - started < args.attack:
            fds.append(daemon.open_fds())
            status.append(await trio.to_thread.run_sync(daemon.status_seconds))
            rest.append(await rest_status(client, daemon.token))
            p2p.append(await p2p_upgrade(daemon.p2p_port))
            await trio.sleep(2)
        elapsed = time.monotonic() - started
        nursery.cancel_scope.cancel()
    new_log = daemon.log_text()[len(log_before) :]
    minutes = elapsed / 60
    return {
        "attack_s": round(elapsed, 1),
        "connections_opened": flood.opened,
        "connections_connected_at_full": connected_at_full,
        "closed_by_node": flood.closed_by_node,
        "connect_timeouts_5s": flood.connect_timeouts,
        "node_open_fds_max": max(fds) if fds else None,
        "dmgn_status_during": summary(status),
        "rest_status_during": summary(rest),
        "p2p_upgrade_during": summary(p2p),
        "accept_emfile_log_lines_per_min": round(accept_failure_lines(new_log) / minutes, 1),
        "tracebacks_logged_per_min": round(tracebacks(new_log) / minutes, 1),
        "node_alive_after": daemon.alive(),
    }


async def partial_body_phase(daemon: Daemon, wait: float) -> dict[str, Any]:
    t0 = time.monotonic()
    stream = await trio.open_tcp_stream("127.0.0.1", daemon.api_port)
    answer = b""
    async with stream:
        await stream.send_all(
            b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {daemon.token}\r\nContent-Length: 100\r\n\r\n".encode()
            + b'{"text": "'
        )
        with trio.move_on_after(wait):
            with contextlib.suppress(trio.BrokenResourceError):
                while chunk := await stream.receive_some(4096):
                    answer += chunk
            return {
                "held_s": round(time.monotonic() - t0, 1),
                "answer": answer.split(b"\r\n", 1)[0].decode(errors="replace") or "(closed)",
            }
    return {"held_s": f">{wait:g} (still held when we gave up)", "answer": None}


def deep_json_phase(daemon: Daemon) -> dict[str, Any]:
    before = tracebacks(daemon.log_text())
    response = httpx.post(
        f"http://127.0.0.1:{daemon.api_port}/v1/query",
        content=DEEP_JSON,
        headers={"Authorization": f"Bearer {daemon.token}", "Content-Type": "application/json"},
        timeout=30,
    )
    return {
        "status": response.status_code,
        "body": response.text[:160],
        "tracebacks_logged": tracebacks(daemon.log_text()) - before,
    }


def surrogate_phase(daemon: Daemon) -> dict[str, Any]:
    # json.dumps escapes the lone surrogate as \udc00: valid JSON, not valid text.
    body = json.dumps({"content": "x", "metadata": {"k": "\udc00"}}).encode()
    codes: list[int | str] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.api_port}", timeout=30) as client:
        for _ in range(10):
            try:
                response = client.post(
                    "/v1/memories",
                    content=body,
                    headers={
                        "Authorization": f"Bearer {daemon.token}",
                        "Content-Type": "application/json",
                    },
                )
                codes.append(response.status_code)
                last = response.text[:200]
            except httpx.HTTPError as error:
                codes.append(type(error).__name__)
            time.sleep(0.2)
    time.sleep(2)  # the supervisor's shutdown, if it gives up, takes a moment
    return {
        "status_codes": codes,
        "last_answer": last if codes and isinstance(codes[-1], int) else None,
        "node_alive_after": daemon.alive(),
        "daemon_answers_status_after": daemon.answers_as_daemon(),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process holds the flood
    root = Path(tempfile.mkdtemp(prefix="dmgn-attack-rest-"))
    daemon = Daemon(root / "data", args.nofile)
    result: dict[str, Any] = {}
    try:
        await trio.to_thread.run_sync(daemon.start)
        result["daemon_nofile_limit"] = daemon.nofile_limit()
        quiet = [daemon.status_seconds() for _ in range(5)]
        result["dmgn_status_quiet"] = summary(quiet)
        result["node_open_fds_quiet"] = daemon.open_fds()
        result["flood"] = await flood_phase(daemon, args)
        result["dmgn_status_after_flood"] = summary([daemon.status_seconds() for _ in range(3)])
        result["partial_body"] = await partial_body_phase(daemon, args.partial_wait)
        result["deep_json"] = await trio.to_thread.run_sync(deep_json_phase, daemon)
        result["surrogates"] = await trio.to_thread.run_sync(surrogate_phase, daemon)
    finally:
        daemon.kill()
        shutil.rmtree(root, ignore_errors=True)
    return result


def render(results: dict[str, Any]) -> str:
    labels = list(results)
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, get: Any) -> None:
        values = []
        for label in labels:
            try:
                values.append(str(get(results[label])))
            except (KeyError, TypeError):
                values.append("-")
        rows.append((name, values))

    row("daemon `ulimit -n`", lambda r: r["daemon_nofile_limit"])
    row("`dmgn status`, quiet: median s", lambda r: r["dmgn_status_quiet"]["median_s"])
    row("flood: silent connections attempted", lambda r: r["args"]["connections"])
    row(
        "flood: connected (accepted or in the backlog) once all were opened",
        lambda r: r["flood"]["connections_connected_at_full"],
    )
    row("flood: node's open fds (max)", lambda r: r["flood"]["node_open_fds_max"])
    row("flood: closed by the node", lambda r: r["flood"]["closed_by_node"])
    row(
        "flood: `dmgn status` median / max s (failed)",
        lambda r: "{median_s} / {max_s} ({failed}/{n})".format(**r["flood"]["dmgn_status_during"]),
    )
    row(
        "flood: authorised GET /v1/status median / max s (failed)",
        lambda r: "{median_s} / {max_s} ({failed}/{n})".format(**r["flood"]["rest_status_during"]),
    )
    row(
        "flood: P2P WebSocket upgrade median / max s (failed)",
        lambda r: "{median_s} / {max_s} ({failed}/{n})".format(**r["flood"]["p2p_upgrade_during"]),
    )
    row(
        "flood: accept-EMFILE log lines / min",
        lambda r: r["flood"]["accept_emfile_log_lines_per_min"],
    )
    row("flood: tracebacks logged / min", lambda r: r["flood"]["tracebacks_logged_per_min"])
    row(
        "`dmgn status` after the flood: median s",
        lambda r: r["dmgn_status_after_flood"]["median_s"],
    )
    row("partial body held for s", lambda r: r["partial_body"]["held_s"])
    row("partial body: answer", lambda r: r["partial_body"]["answer"])
    row("5,000-deep JSON: status", lambda r: r["deep_json"]["status"])
    row("5,000-deep JSON: tracebacks logged", lambda r: r["deep_json"]["tracebacks_logged"])
    row(
        "10 surrogate adds: statuses",
        lambda r: " ".join(str(c) for c in r["surrogates"]["status_codes"]),
    )
    row("node alive after them", lambda r: r["surrogates"]["node_alive_after"])
    row(
        "the daemon answers `dmgn status` after them",
        lambda r: r["surrogates"]["daemon_answers_status_after"],
    )
    lines = [
        "# REST under attack (issue 30: items 3, 7, 8c, 8d)",
        "",
        "`benchmarks/attack_rest.py`: a real `dmgn-node` started by `dmgn start` with REST on",
        "127.0.0.1 and `RLIMIT_NOFILE` 1024; see the script's docstring for what is measured.",
        "",
        "| measure | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    lines += [f"| {name} | " + " | ".join(values) + " |" for name, values in rows]
    lines += [
        "",
        "Reading it: *connected* counts the attacker's connect() calls that returned (a full",
        "listen backlog makes the rest wait in SYN retries); *node's open fds* is sampled from",
        "/proc every round; *closed by the node* counts connections the attacker saw closed",
        "(idle timeouts, and from issue 30 on also evictions: at the cap a newcomer takes the",
        "slot of the longest-idle connection, so a reconnecting attacker churns). Each round of",
        "the flood runs `dmgn status` (a whole CLI process), one authorised `GET /v1/status`",
        "(a fresh connection) and one WebSocket upgrade on the P2P port, one after the other,",
        "so a slow round means fewer rounds.",
        "",
    ]
    for label in labels:
        r = results[label]
        lines.append(
            f"- **{label}**: code from `{r.get('code_under_test')}`, {r.get('when')}, "
            f"{r.get('machine')}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="before / after: the column to write")
    parser.add_argument("--attack", type=float, default=60.0, help="seconds of flood")
    parser.add_argument("--connections", type=int, default=1100)
    parser.add_argument("--ramp", type=float, default=200.0, help="connections opened per second")
    parser.add_argument("--nofile", type=int, default=1024, help="the daemon's RLIMIT_NOFILE")
    parser.add_argument("--partial-wait", type=float, default=45.0)
    args = parser.parse_args()
    result = trio.run(run, args)
    result["code_under_test"] = subprocess.run(
        [sys.executable, "-c", "import dmgn, os; print(os.path.dirname(dmgn.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    result["args"] = vars(args)
    result["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "attack_rest.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    results[args.label] = result
    ordered = {k: results[k] for k in sorted(results, key=lambda k: (k != "before", k))}
    path.write_text(json.dumps(ordered, indent=2) + "\n")
    (RESULTS / "attack_rest.md").write_text(render(ordered))
    print(render(ordered))


if __name__ == "__main__":
    main()
