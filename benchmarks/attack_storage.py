"""Issue 30 (storage) under attack: log floods, free owner keys, read amplification, disk and RAM.

    PYTHONPATH=<code under test> .venv/bin/python benchmarks/attack_storage.py --out-label after

The code under test is whatever ``dmgn`` the interpreter imports (set PYTHONPATH to a checkout;
the `dmgn-node` processes inherit it), so the same script measures an old checkout ("before")
and this one ("after"). Results are merged into benchmarks/results/attack_storage.json under
``--out-label``, and benchmarks/results/attack_storage.md is rewritten from every label there.
Loopback only; takes about two to three minutes.

Two real `dmgn-node` processes (`dmgn init` + `dmgn start`, mDNS off, no bootstrap peers):

* node S (``storage_quota`` = `SMALL_QUOTA`, 64 MiB, scaled down from the issue's 256 MiB so a
  run stays short), attacked by strangers in storage mode from 127.0.0.10 onwards:
  1. log flood: `--flood` seconds of ``mail.heads`` with a bad owner proof from one connection;
     bytes the node wrote (``/proc/<pid>/io`` wchar; nothing else writes then) and whether the
     start-up lines are still in the logs;
  2. a fresh owner key per request: `FRESH_REQUESTS` 1 KiB puts, each under a new key, from one
     address; how many were served;
  3. quota fill: 4 fresh keys on one connection put 768 KiB batches until refused; bytes held,
     how long it took, and whether an honest owner from another address is still served;
  4. fill the rest from 8 more addresses (one key each) until refused, then storage.duckdb's
     size and the node's RSS.
* node L (default 1 GiB quota): first, 4 addresses put 256 one-byte objects a request for 15 s
  (disk per byte held: what the quota promises against what the disk holds); then one owner
  pushes `AMP_SEQS` mail items and `AMP_OBJECTS`
  objects of the largest size the code under test accepts; then 8 connections each pull all
  the seqs and get all the objects in one request, over and over, for `--amp` seconds, while an
  honest owner (another address) gets one small object every 0.2 s and ``dmgn status`` runs;
  the node's RSS every 0.1 s.

And in this process (no network; `MemoryStorageTables`, so the service's own cost shows, not
DuckDB's): put throughput of one owner with no other owners, and after `MANY_OWNERS` fresh
owners have stored one byte each; Python heap per fresh owner (tracemalloc).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# The code under test comes from PYTHONPATH, never from this script's directory (which holds a
# benchmarks/wire.py that would shadow the wire package).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import trio  # noqa: E402
from nacl.signing import SigningKey  # noqa: E402

from actors import storage as sg  # noqa: E402
from actors._storage_tables import MemoryStorageTables  # noqa: E402
from actors.node import DEVICE_REGISTRY  # noqa: E402
from actors.runtime import Ok, Result, expect  # noqa: E402
from actors.runtime import call as call_actor  # noqa: E402
from dmgn import api  # noqa: E402
from dmgn import storage_protocol as sp  # noqa: E402
from dmgn.app.control_client import call  # noqa: E402
from dmgn.paths import DataDir  # noqa: E402
from dmgn.shards import MAX_MAIL_ITEM_BYTES, MAX_SHARD_BYTES  # noqa: E402
from wire import Message, Mode, PeerIdentity, SecureConnection, WireError, secure_connection  # noqa: E402
from wire.testing import TestIdentity  # noqa: E402
from wire.websocket import WebSocketNetwork  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PASSPHRASE = "attack-benchmark"
#: Node S's quota (the issue filled 256 MiB; a quarter keeps the run short).
SMALL_QUOTA = 64 * 1024 * 1024
FRESH_REQUESTS = 2000
#: Largest item / object the code under test accepts, at most the issue's 2 MiB.
AMP_ITEM = min(2 * 1024 * 1024, MAX_MAIL_ITEM_BYTES)
AMP_OBJECT = min(512 * 1024, MAX_SHARD_BYTES)
AMP_SEQS = 64
AMP_OBJECTS = 128
AMP_PULLERS = 8
MANY_OWNERS = 20_000


def free_port() -> int:
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        return int(tcp.getsockname()[1])


class Node:
    def __init__(self, root: Path, name: str, quota: int | None) -> None:
        self.root = root / name
        self.address = f"ws://127.0.0.1:{free_port()}"
        self.quota = quota
        self.env = {
            **os.environ,
            "DMGN_DATA_DIR": str(self.root),
            "DMGN_PASSPHRASE": PASSPHRASE,
            "DMGN_EMBEDDER": "hashing",
        }
        self.pid = 0

    def cli(self, *args: str) -> Any:
        done = subprocess.run(
            [sys.executable, "-m", "dmgn.app.cli", *args, "--json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"dmgn {' '.join(args)}: {done.stderr.strip()}")
        return json.loads(done.stdout) if done.stdout.strip() else None

    def start(self) -> None:
        self.cli("init")
        path = self.root / "config.json"
        document = json.loads(path.read_text())
        document.update(listen_addr=self.address, bootstrap_peers=[], mdns=False)
        if self.quota is not None:
            document["storage_quota"] = self.quota
        path.write_text(json.dumps(document))
        self.pid = int(self.cli("start")["pid"])

    def request(self, request: api.AnyRequest) -> dict[str, Any]:
        return call(DataDir(self.root), request)

    def kill(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, 9)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def written(self) -> int:
        for line in Path(f"/proc/{self.pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
        return 0

    def held(self) -> int:
        return int(self.request(api.Status())["storage"]["bytes_held"])


class Client:
    """A stranger in storage mode (fresh identity) from ``source``; requests pipelined."""

    def __init__(self, connection: SecureConnection) -> None:
        self.connection = connection
        self.rid = 0
        self.waiting: dict[int, trio.MemorySendChannel[Message]] = {}
        self.codes: dict[str, int] = {}

    def proof(self, key: SigningKey) -> bytes:
        storage_key = self.connection.peer.identity_public_key
        message = sp.OWNER_PROOF_CONTEXT + sp.owner_proof_message(storage_key)
        return key.sign(message).signature

    async def reader(self) -> None:
        with contextlib.suppress(WireError, trio.ClosedResourceError):
            while True:
                answer = await self.connection.receive()
                if answer.type == sp.REPLY.name:
                    waiter = self.waiting.pop(int(answer.get_int("rid")), None)
                    if waiter is not None:
                        waiter.send_nowait(answer)

    async def ask(self, kind: Any, **fields: Any) -> Message:
        self.rid += 1
        rid = self.rid
        send, receive = trio.open_memory_channel[Message](1)
        self.waiting[rid] = send
        await self.connection.send(kind(rid=rid, **fields))
        answer = await receive.receive()
        code = answer.get_str("code") or "ok"
        self.codes[code] = self.codes.get(code, 0) + 1
        return answer


@contextlib.asynccontextmanager
async def stranger(address: str, source: str) -> Any:
    network = WebSocketNetwork(source_address=source)
    async with network.dial(address) as stream:
        connection = await secure_connection(
            stream,
            TestIdentity.generate().new_device(),
            initiator=True,
            mode=Mode.STORAGE,
            registry=DEVICE_REGISTRY,
        )
        client = Client(connection)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.reader)
            yield client
            nursery.cancel_scope.cancel()


async def pipelined(count: int, window: int, one: Callable[[int], Awaitable[None]]) -> None:
    """Run ``one(i)`` for i < count with at most ``window`` in flight."""
    limiter = trio.CapacityLimiter(window)

    async def run(i: int) -> None:
        async with limiter:
            await one(i)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            await limiter.acquire()  # keep at most `window` tasks alive
            limiter.release()
            nursery.start_soon(run, i)


def oid(*parts: object) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()


# -- node S: logs, fresh keys, quota, disk --------------------------------------------------


async def log_flood(node: Node, seconds: float) -> dict[str, Any]:
    before = await trio.to_thread.run_sync(node.written)
    sent = 0
    async with stranger(node.address, "127.0.0.10") as client:
        bad = bytes(64)
        with trio.move_on_after(seconds):

            async def one(_: int) -> None:
                nonlocal sent
                await client.ask(sp.MAIL_HEADS, owner=os.urandom(32), proof=bad)
                sent += 1

            await pipelined(10**9, 64, one)
    written = await trio.to_thread.run_sync(node.written) - before
    logs = sorted((node.root / "logs").glob("dmgn-node.log*"))
    text = "".join(p.read_text(errors="replace") for p in logs)
    return {
        "flood_s": seconds,
        "flood_requests": sent,
        "flood_requests_per_s": round(sent / seconds),
        "flood_bytes_written": written,
        "flood_bytes_written_per_min": round(written * 60 / seconds),
        "flood_log_files": len(logs),
        "flood_start_lines_kept": " ready (pid " in text,
        "flood_refused_lines_in_logs": text.count("refused mail.heads"),
    }


async def fresh_keys(node: Node) -> dict[str, Any]:
    served = 0
    started = time.monotonic()
    async with stranger(node.address, "127.0.0.11") as client:

        async def one(i: int) -> None:
            nonlocal served
            key = SigningKey.generate()
            owner = bytes(key.verify_key)
            answer = await client.ask(
                sp.PUT,
                owner=owner,
                proof=client.proof(key),
                oids=[oid("fresh", i)],
                blobs=[os.urandom(1024)],
            )
            served += answer.get_str("code") == ""

        await pipelined(FRESH_REQUESTS, 32, one)
        codes = client.codes
    return {
        "fresh_key_requests": FRESH_REQUESTS,
        "fresh_key_served": served,
        "fresh_key_s": round(time.monotonic() - started, 1),
        "fresh_key_codes": codes,
    }


async def fill(node: Node, source: str, keys: int, deadline: float) -> tuple[int, dict[str, int]]:
    """Put 768 KiB batches under ``keys`` fresh keys from one connection until every key is
    refused (or ``deadline``); returns (bytes accepted, answers by code)."""
    accepted = 0
    batch = [os.urandom(4096) for _ in range(sp.MAX_BATCH_BYTES // 4096)]
    async with stranger(node.address, source) as client:
        with trio.move_on_after(deadline):

            async def owner(k: int) -> None:
                nonlocal accepted
                key = SigningKey.generate()
                proof = client.proof(key)
                refused_in_a_row = 0
                for n in range(10**9):
                    answer = await client.ask(
                        sp.PUT,
                        owner=bytes(key.verify_key),
                        proof=proof,
                        oids=[oid(source, k, n, i) for i in range(len(batch))],
                        blobs=batch,
                    )
                    code = answer.get_str("code")
                    if code == "":
                        accepted += sum(len(b) for b in batch)
                        refused_in_a_row = 0
                    elif code == "rate":
                        await trio.sleep(0.2)
                    else:
                        refused_in_a_row += 1
                        if refused_in_a_row >= 3:
                            return
                        await trio.sleep(0.2)

            async with trio.open_nursery() as nursery:
                for k in range(keys):
                    nursery.start_soon(owner, k)
        return accepted, client.codes


async def honest_put(node: Node, source: str) -> str:
    async with stranger(node.address, source) as client:
        key = SigningKey.generate()
        answer = await client.ask(
            sp.PUT,
            owner=bytes(key.verify_key),
            proof=client.proof(key),
            oids=[oid("honest", source)],
            blobs=[os.urandom(1024)],
        )
        return answer.get_str("code") or "served"


async def node_s(root: Path, flood: float) -> dict[str, Any]:
    node = Node(root, "s", SMALL_QUOTA)
    try:
        await trio.to_thread.run_sync(node.start)
        result = {"quota_mib": SMALL_QUOTA >> 20, "rss_idle_mb": round(node.rss_mb(), 1)}
        result |= await log_flood(node, flood)
        result |= await fresh_keys(node)
        started = time.monotonic()
        accepted, codes = await fill(node, "127.0.0.12", 4, 60)
        result |= {
            "fill_4_keys_accepted_mib": round(accepted / 2**20, 1),
            "fill_4_keys_s": round(time.monotonic() - started, 1),
            "fill_4_keys_codes": codes,
            "honest_after_4_keys": await honest_put(node, "127.0.0.13"),
        }
        async with trio.open_nursery() as nursery:
            for n in range(8):
                nursery.start_soon(fill, node, f"127.0.0.{20 + n}", 1, 60)
        await trio.sleep(5)  # let DuckDB settle before measuring RSS
        held = await trio.to_thread.run_sync(node.held)
        result |= {
            "filled_bytes_held_mib": round(held / 2**20, 1),
            "filled_duckdb_mb": round((node.root / "storage.duckdb").stat().st_size / 1e6, 1),
            "filled_rss_mb": round(node.rss_mb(), 1),
        }
        return result
    finally:
        node.kill()


# -- node L: tiny objects, then read amplification --------------------------------------------


async def tiny_objects(node: Node, seconds: float) -> dict[str, Any]:
    """4 addresses put 256 one-byte objects a request for ``seconds``: disk per byte held."""
    rows = 0

    async def one_address(n: int) -> None:
        nonlocal rows
        async with stranger(node.address, f"127.0.0.{60 + n}") as client:
            key = SigningKey.generate()
            owner, proof = bytes(key.verify_key), client.proof(key)
            with trio.move_on_after(seconds):
                for i in range(10**9):
                    oids = [oid("tiny", n, i, j) for j in range(256)]
                    answer = await client.ask(
                        sp.PUT, owner=owner, proof=proof, oids=oids, blobs=[b"t"] * 256
                    )
                    code = answer.get_str("code")
                    if code == "":
                        rows += 256
                    elif code == "rate":
                        await trio.sleep(0.2)
                    else:
                        return

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(one_address, n)
    await trio.sleep(3)  # a checkpoint may be under way
    held = await trio.to_thread.run_sync(node.held)
    files = [node.root / "storage.duckdb", node.root / "storage.duckdb.wal"]
    disk = sum(p.stat().st_size for p in files if p.exists())
    return {
        "tiny_rows": rows,
        "tiny_bytes_held_mb": round(held / 1e6, 2),
        "tiny_disk_mb": round(disk / 1e6, 1),
        "tiny_disk_per_byte_held": round(disk / max(held, 1), 2),
    }


async def amplification(root: Path, seconds: float) -> dict[str, Any]:
    node = Node(root, "l", None)
    try:
        await trio.to_thread.run_sync(node.start)
        tiny = await tiny_objects(node, 15)
        key = SigningKey.generate()
        owner = bytes(key.verify_key)
        stream = os.urandom(16)
        item = os.urandom(AMP_ITEM)
        blob = os.urandom(AMP_OBJECT)
        async with stranger(node.address, "127.0.0.40") as client:
            proof = client.proof(key)
            for seq in range(1, AMP_SEQS + 1):
                while True:
                    answer = await client.ask(
                        sp.MAIL_PUSH,
                        owner=owner,
                        proof=proof,
                        stream=stream,
                        first=seq,
                        items=[item],
                    )
                    if answer.get_str("code") != "rate":
                        break
                    await trio.sleep(0.5)
            for n in range(AMP_OBJECTS):
                while True:
                    answer = await client.ask(
                        sp.PUT, owner=owner, proof=proof, oids=[oid("amp", n)], blobs=[blob]
                    )
                    if answer.get_str("code") != "rate":
                        break
                    await trio.sleep(0.5)
            stored = dict(client.codes)
        honest_key = SigningKey.generate()
        rss: list[float] = []
        honest: list[float] = []
        status: list[float] = []
        pulls = 0
        puller_codes: dict[str, int] = {}
        answered = 0
        rss_quiet = node.rss_mb()
        async with stranger(node.address, "127.0.0.41") as honest_client:
            honest_proof = honest_client.proof(honest_key)
            honest_owner = bytes(honest_key.verify_key)
            await honest_client.ask(
                sp.PUT, owner=honest_owner, proof=honest_proof, oids=[oid("h")], blobs=[b"x" * 512]
            )
            quiet: list[float] = []
            for _ in range(5):
                t0 = time.monotonic()
                await honest_client.ask(
                    sp.GET, owner=honest_owner, proof=honest_proof, oids=[oid("h")]
                )
                quiet.append(time.monotonic() - t0)
                await trio.sleep(0.1)

            async def sample() -> None:
                while True:
                    rss.append(node.rss_mb())
                    await trio.sleep(0.1)

            async def honest_gets() -> None:
                while True:
                    t0 = time.monotonic()
                    await honest_client.ask(
                        sp.GET, owner=honest_owner, proof=honest_proof, oids=[oid("h")]
                    )
                    honest.append(time.monotonic() - t0)
                    await trio.sleep(0.2)

            async def statuses() -> None:
                while True:
                    t0 = time.monotonic()
                    await trio.to_thread.run_sync(node.request, api.Status())
                    status.append(time.monotonic() - t0)
                    await trio.sleep(0.5)

            async def puller(n: int) -> None:
                nonlocal pulls, answered
                async with stranger(node.address, f"127.0.0.{50 + n}") as client:
                    proof = client.proof(key)
                    oids = [oid("amp", i) for i in range(min(AMP_OBJECTS, sp.MAX_BATCH_OBJECTS))]
                    try:
                        while True:
                            pulled = await client.ask(
                                sp.MAIL_PULL,
                                owner=owner,
                                proof=proof,
                                stream=stream,
                                first=1,
                                last=AMP_SEQS,
                            )
                            got = await client.ask(sp.GET, owner=owner, proof=proof, oids=oids)
                            for answer, field in ((pulled, "items"), (got, "blobs")):
                                values = answer.fields.get(field, [])
                                assert isinstance(values, list)
                                answered += sum(len(b) for b in values if isinstance(b, bytes))
                            pulls += 1
                            if "rate" in (pulled.get_str("code"), got.get_str("code")):
                                await trio.sleep(0.05)  # as a client told to slow down would
                    finally:
                        for code, count in client.codes.items():
                            puller_codes[code] = puller_codes.get(code, 0) + count

            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample)
                await trio.sleep(0.5)
                nursery.start_soon(honest_gets)
                nursery.start_soon(statuses)
                for n in range(AMP_PULLERS):
                    nursery.start_soon(puller, n)
                await trio.sleep(seconds)
                nursery.cancel_scope.cancel()
        honest.sort()
        status.sort()
        return tiny | {
            "amp_item_bytes": AMP_ITEM,
            "amp_object_bytes": AMP_OBJECT,
            "amp_seqs": AMP_SEQS,
            "amp_objects": AMP_OBJECTS,
            "amp_store_codes": stored,
            "amp_rounds": pulls,
            "amp_answers_by_code": puller_codes,
            "amp_bytes_answered_mb": round(answered / 1e6),
            "amp_rss_quiet_mb": round(rss_quiet, 1),
            "amp_rss_peak_mb": round(max(rss), 1),
            "amp_honest_get_quiet_max_s": round(max(quiet), 3),
            "amp_honest_get_max_s": round(honest[-1], 3),
            "amp_honest_get_median_s": round(honest[len(honest) // 2], 3),
            "amp_status_max_s": round(status[-1], 3),
            "amp_status_median_s": round(status[len(status) // 2], 3),
        }
    finally:
        node.kill()


# -- in process: many fresh owners ----------------------------------------------------------


async def many_owners() -> dict[str, Any]:
    replies = 0
    done = trio.Event()
    target = 0

    async def send(peer: PeerIdentity, message: Message) -> Result[None]:
        nonlocal replies
        replies += 1
        if replies >= target:
            done.set()
        return Ok(None)

    node_key = SigningKey.generate()
    storage_key = bytes(node_key.verify_key)
    fields = {f.name for f in dataclasses.fields(sg.StorageLimits)}
    # A node that lets one address bring any number of owners (when the code under test caps
    # that), so this measures what each owner costs, not the cap.
    generous = {name: 10**9 for name in fields if "new_owners" in name}
    limits = sg.StorageLimits(quota=1 << 30, per_owner_quota=1 << 30, **generous)
    service = sg.StorageService(
        None,
        owner=os.urandom(32),
        storage_key=storage_key,
        send=send,
        limits=limits,
        tables=MemoryStorageTables(),
    )
    takes_address = "address" in {f.name for f in dataclasses.fields(sg.StorageRequest)}
    peer = PeerIdentity(os.urandom(32), os.urandom(16), os.urandom(32))
    proof_for = sp.OWNER_PROOF_CONTEXT + sp.owner_proof_message(storage_key)

    def request(message: Message, n: int) -> sg.StorageRequest:
        # Owner n (0: the honest one) asks from its own connection and address, as fresh
        # owners spread over many machines would: what each owner costs, not the meters.
        who = peer if n == 1 else PeerIdentity(os.urandom(32), os.urandom(16), os.urandom(32))
        if takes_address:
            address = f"ws://10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}:4000"
            return sg.StorageRequest(who, message, address=address)
        return sg.StorageRequest(who, message)

    async def run_puts(messages: list[sg.StorageRequest]) -> float:
        nonlocal target, done
        target = replies + len(messages)
        done = trio.Event()
        t0 = time.monotonic()
        for m in messages:
            await service.mailbox.address.send(m)
        await done.wait()
        return time.monotonic() - t0

    honest = SigningKey.generate()
    honest_proof = honest.sign(proof_for).signature

    def honest_puts(tag: str) -> list[sg.StorageRequest]:
        return [
            request(
                sp.PUT(
                    rid=i,
                    owner=bytes(honest.verify_key),
                    proof=honest_proof,
                    oids=[oid(tag, i)],
                    blobs=[b"h" * 64],
                ),
                1,
            )
            for i in range(1000)
        ]

    keys = [SigningKey.generate() for _ in range(MANY_OWNERS)]
    fresh = [
        request(
            sp.PUT(
                rid=i,
                owner=bytes(k.verify_key),
                proof=k.sign(proof_for).signature,
                oids=[oid("o", i)],
                blobs=[b"o"],
            ),
            i + 2,
        )
        for i, k in enumerate(keys)
    ]
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        first = await run_puts(honest_puts("a"))
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        half = MANY_OWNERS // 2
        owners_s = await run_puts(fresh[:half])
        middle = tracemalloc.get_traced_memory()[0]
        owners_s += await run_puts(fresh[half:])
        end = tracemalloc.get_traced_memory()[0]
        per_owner = (end - base) / MANY_OWNERS
        # The second half's cost: what one more owner adds once bounded state is full.
        marginal = (end - middle) / (MANY_OWNERS - half)
        tracemalloc.stop()
        second = await run_puts(honest_puts("b"))
        status = await expect(await call_actor(service.mailbox.address, sg.StorageState))
        nursery.cancel_scope.cancel()
    return {
        "owners_fresh": MANY_OWNERS,
        "owners_fresh_served": status.identities - 1,
        "owners_fresh_puts_per_s": round(MANY_OWNERS / owners_s),
        "owners_heap_bytes_per_fresh_owner": round(per_owner),
        "owners_heap_bytes_per_owner_10k_to_20k": round(marginal),
        "owners_puts_per_s_alone": round(1000 / first),
        "owners_puts_per_s_after_fresh": round(1000 / second),
    }


# -- report ---------------------------------------------------------------------------------


ROWS: list[tuple[str, str]] = [
    ("2: bad-proof mail.heads sent in the flood (per s)", "flood_requests_per_s"),
    ("2: bytes the node wrote per minute of flood", "flood_bytes_written_per_min"),
    ("2: refusal lines of the flood in the logs", "flood_refused_lines_in_logs"),
    ("2: start-up lines still in the logs", "flood_start_lines_kept"),
    ("4: fresh key per put: served of 2,000", "fresh_key_served"),
    ("4: fresh key per put: answers by code", "fresh_key_codes"),
    ("4: 4 fresh keys, one connection: MiB accepted", "fill_4_keys_accepted_mib"),
    ("4: ... seconds until refused", "fill_4_keys_s"),
    ("4: honest owner from another address afterwards", "honest_after_4_keys"),
    ("6: quota filled from 9 more addresses: MiB held", "filled_bytes_held_mib"),
    ("6: storage.duckdb size when full (MB)", "filled_duckdb_mb"),
    ("6: node RSS when full (MB; idle before: rss_idle_mb)", "filled_rss_mb"),
    ("6: one-byte objects stored in 15 s from 4 addresses", "tiny_rows"),
    ("6: ... bytes held (charged) (MB)", "tiny_bytes_held_mb"),
    ("6: ... storage.duckdb + .wal (MB)", "tiny_disk_mb"),
    (
        "6: ... disk bytes per byte held (over 1: the quota understates the disk)",
        "tiny_disk_per_byte_held",
    ),
    ("5: mail item size the node accepts (bytes)", "amp_item_bytes"),
    ("5: RSS before the pullers (MB)", "amp_rss_quiet_mb"),
    ("5: RSS peak during 8 pullers (MB)", "amp_rss_peak_mb"),
    ("5: pull+get rounds asked in the attack", "amp_rounds"),
    ("5: ... answers by code", "amp_answers_by_code"),
    ("5: ... bytes answered (MB)", "amp_bytes_answered_mb"),
    ("5: another owner's get: quiet max (s)", "amp_honest_get_quiet_max_s"),
    ("5: another owner's get during: median (s)", "amp_honest_get_median_s"),
    ("5: another owner's get during: max (s)", "amp_honest_get_max_s"),
    ("5: `dmgn status` round trip during: median (s)", "amp_status_median_s"),
    ("5: `dmgn status` round trip during: max (s)", "amp_status_max_s"),
    ("6: fresh owners served (in process, of 20,000)", "owners_fresh_served"),
    (
        "6: Python heap per fresh owner, tables included (bytes)",
        "owners_heap_bytes_per_fresh_owner",
    ),
    ("6: ... the same, owners 10,001 to 20,000", "owners_heap_bytes_per_owner_10k_to_20k"),
    ("6: one owner's puts/s, alone", "owners_puts_per_s_alone"),
    ("6: one owner's puts/s after 20,000 fresh owners", "owners_puts_per_s_after_fresh"),
]


def markdown(results: dict[str, dict[str, Any]]) -> str:
    labels = list(results)
    lines = [
        "| measure | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for title, key in ROWS:
        values = [str(results[label].get(key, "")) for label in labels]
        lines.append(f"| {title} | " + " | ".join(values) + " |")
    meta = "\n".join(
        f"- {label}: {results[label].get('code_under_test', '?')}, "
        f"{results[label].get('when', '?')}, {results[label].get('run_s', '?')} s"
        for label in labels
    )
    return f"""# Storage under attack (issue 30 items 2, 4, 5, 6): results

`benchmarks/attack_storage.py` (see its docstring for the setup). Node S has a
{SMALL_QUOTA >> 20} MiB quota (the issue used 256 MiB; scaled down so a run takes minutes);
node L the default 1 GiB. Strangers come from 127.0.0.10 onwards, a fresh identity each.
Machine: {platform.machine()}, {os.cpu_count()} cores shared with other work.

{chr(10).join(lines)}

Runs:
{meta}
"""


async def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="dmgn-attack-storage-"))
    started = time.monotonic()
    try:
        result: dict[str, Any] = {}
        result |= await many_owners()
        result |= await node_s(root, args.flood)
        result |= await amplification(root, args.amp)
        result["run_s"] = round(time.monotonic() - started)
        return result
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flood", type=float, default=20.0)
    parser.add_argument("--amp", type=float, default=20.0)
    parser.add_argument("--out-label", default="after")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = trio.run(run, args)
    import dmgn  # the code under test: where it came from

    result["code_under_test"] = str(Path(dmgn.__file__).resolve().parents[1])
    result["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "attack_storage.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[args.out_label] = result
    path.write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "attack_storage.md").write_text(markdown(results))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
