"""Fast under load: the embedding path, MCP latency, bulk import, CLI start-up, long memories.

Run: ``python benchmarks/embedding.py [--only SECTION ...] [--out benchmarks/results]``.
Writes ``embedding.json`` and ``embedding.md``. Every ratio compares figures of one run.

The *load* case is what a user's laptop running another local model looks like: two separate
Python processes doing numpy matrix products (OpenBLAS with its default threads) beside the
code measured, started before and stopped after each loaded measurement.

Sections:

* ``embedding`` — texts/s (256 short texts in one call) and single-text p50/p99 for the
  model on numpy with OpenBLAS' default threads (what dmgn did before), numpy with one
  thread, and onnxruntime, each quiet and under load.
* ``mcp`` — a real daemon (``dmgn start``, model on) and the MCP SDK's client over the
  bridge's socket: ``add_memory`` and ``query_memory`` p50/p99 quiet and under load.
* ``bulk`` — ``dmgn add --jsonl`` of 10k short texts through the daemon, with the model and
  with the lexical embedder: memories/s until all are searchable (and until acknowledged), the
  daemon's CPU ms per memory, and ``dmgn status`` wall time while the import runs.
* ``status`` — ``dmgn status`` through the daemon against ``python -c pass``
  (hyperfine-style: warm-up, then several alternating runs; mean and min).
* ``long`` — generated long documents with one fact at a random depth; recall@5 by meaning
  (alpha = 1) of a question about the fact, with one vector per memory (the first 256 word
  pieces, as before) and with sentence windows.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LOAD_SCRIPT = """
import sys, time, numpy as np
a = np.random.default_rng(0).standard_normal((512, 512))
print("busy", flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    a = np.tanh(a @ a)
"""


@contextlib.contextmanager
def cpu_load(processes: int = 2, seconds: float = 600.0) -> Iterator[None]:
    """Two (by default) numpy matrix-product processes, each with numpy's default threads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS", "OMP_"))}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOAD_SCRIPT, str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(processes)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "busy"
        time.sleep(1.0)  # let them reach full speed
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def latencies(fn: Callable[[], object], runs: int, warmup: int = 3) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return {
        "p50_ms": round(percentile(times, 50), 2),
        "p99_ms": round(percentile(times, 99), 2),
        "runs": runs,
    }


# -- embedding ---------------------------------------------------------------------------------

SHORT = [
    f"note {i}: {text}"
    for i, text in enumerate(
        [
            "I finally adopted a beagle puppy from the shelter last weekend.",
            "The quarterly review moved to Thursday afternoon.",
            "Remember to renew the car insurance before March.",
            "Alice prefers green tea without sugar.",
            "The deploy failed because the certificate had expired.",
            "We are flying to Lisbon in October for the anniversary.",
            "My dentist appointment is on the fifth at nine.",
            "The recipe needs two cups of flour and a pinch of salt.",
        ]
        * 32
    )
]


def embedding_section(runs: int, batch: int) -> dict[str, Any]:
    from threadpoolctl import threadpool_info

    from dmgn.embedding import MiniLMEmbedder

    numpy_default = MiniLMEmbedder(backend="numpy")
    numpy_default._thread_limit = lambda threads: contextlib.nullcontext()  # type: ignore[method-assign]
    numpy_one = MiniLMEmbedder(backend="numpy", threads=1)
    onnx = MiniLMEmbedder(backend="onnxruntime")
    onnx_one = MiniLMEmbedder(backend="onnxruntime", threads=1)
    variants = {
        "numpy, OpenBLAS default threads (before)": numpy_default,
        "numpy, 1 thread": numpy_one,
        f"onnxruntime, 1 thread single / {onnx._threads} batch": onnx,
        "onnxruntime, 1 thread": onnx_one,
    }
    out: dict[str, Any] = {
        "blas": [
            {k: i.get(k) for k in ("internal_api", "num_threads", "version", "architecture")}
            for i in threadpool_info()
        ],
        "batch_texts": batch,
        "results": {},
    }
    for case in ("quiet", "load"):
        with cpu_load() if case == "load" else contextlib.nullcontext():
            for name, model in variants.items():
                single = latencies(lambda m=model: m.embed([SHORT[1]]), runs)
                model.embed(SHORT[:8])
                start = time.perf_counter()
                model.embed(SHORT[:batch])
                rate = batch / (time.perf_counter() - start)
                out["results"].setdefault(name, {})[case] = {
                    **single,
                    "texts_per_s": round(rate, 1),
                }
                print(case, name, out["results"][name][case], flush=True)
    return out


# -- a daemon, for mcp / bulk / status ------------------------------------------------------------


class Daemon:
    def __init__(self, root: Path, embedder: str) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.data_dir = root / "d"
        self.passphrase = root / "pass"
        self.passphrase.write_text("benchmark passphrase\n")
        self.env = {**os.environ, "DMGN_EMBEDDER": embedder}
        self.env.pop("DMGN_DATA_DIR", None)
        self.dmgn = [sys.executable, "-m", "dmgn.app.cli"]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.dmgn, *args, "--data-dir", str(self.data_dir)],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
        )

    def __enter__(self) -> Daemon:
        self.cli("init", "--passphrase-file", str(self.passphrase))
        config_path = self.data_dir / "config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        config.update(listen_addr="ws://127.0.0.1:0", mdns=False)
        config_path.write_text(json.dumps(config))
        self.cli("start", "--passphrase-file", str(self.passphrase), "--timeout", "180")
        return self

    def __exit__(self, *exc: object) -> None:
        self.cli("stop", "--timeout", "60", "--force", check=False)


def mcp_section(root: Path, adds: int, queries: int) -> dict[str, Any]:
    import trio
    from mcp import ClientSession

    from actors.mcp_bridge import mcp_message_streams
    from dmgn.paths import DataDir

    out: dict[str, Any] = {}
    with Daemon(root / "mcp", "model") as daemon:
        status = json.loads(daemon.cli("status", "--json").stdout)
        out["backend"] = status["index"].get("backend")
        socket_path = DataDir(daemon.data_dir).mcp_socket

        async def measure(case: str) -> dict[str, Any]:
            stream = await trio.open_unix_socket(os.fspath(socket_path))
            async with (
                stream,
                mcp_message_streams(stream) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                timings: dict[str, list[float]] = {"add_memory": [], "query_memory": []}
                for i in range(adds + 3):
                    start = time.perf_counter()
                    result = await session.call_tool(
                        "add_memory", {"content": f"{case} {i}: {SHORT[i % len(SHORT)]}"}
                    )
                    assert not result.is_error, result
                    if i >= 3:
                        timings["add_memory"].append((time.perf_counter() - start) * 1000)
                for i in range(queries + 3):
                    start = time.perf_counter()
                    result = await session.call_tool(
                        "query_memory", {"query": f"what about {SHORT[i % 8][8:40]}", "limit": 5}
                    )
                    assert not result.is_error, result
                    if i >= 3:
                        timings["query_memory"].append((time.perf_counter() - start) * 1000)
            return {
                tool: {
                    "p50_ms": round(percentile(t, 50), 2),
                    "p99_ms": round(percentile(t, 99), 2),
                    "runs": len(t),
                }
                for tool, t in timings.items()
            }

        out["quiet"] = trio.run(measure, "quiet")
        print("mcp quiet", out["quiet"], flush=True)
        with cpu_load():
            out["load"] = trio.run(measure, "load")
        print("mcp load", out["load"], flush=True)
        for tool in ("add_memory", "query_memory"):
            out[f"{tool}_load_over_quiet_p50"] = round(
                out["load"][tool]["p50_ms"] / out["quiet"][tool]["p50_ms"], 2
            )
    return out


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def bulk_section(root: Path, count: int) -> dict[str, Any]:
    """``dmgn add --jsonl`` of ``count`` short texts through a daemon, per embedder.

    The rate counts until every memory is searchable (``index.memories`` reaches ``count``),
    not only until the import is acknowledged (an add is answered once durable and queued for
    indexing); both times are reported. ``dmgn status`` is run every half second during the
    import to show the node stays responsive (wall time of each, CLI start-up included).
    The daemon's CPU seconds per memory are reported too: on a machine other sessions share,
    they say more than the wall time."""
    out: dict[str, Any] = {"memories": count}
    source = root / "import.jsonl"
    with source.open("w") as f:
        for i in range(count):
            f.write(json.dumps({"content": f"imported {i}: {SHORT[i % len(SHORT)]}"}) + "\n")
    for embedder in ("model", "hashing"):
        with Daemon(root / f"bulk-{embedder}", embedder) as daemon:
            idle = []
            for _ in range(3):
                begin = time.perf_counter()
                daemon.cli("status", "--json")
                idle.append(time.perf_counter() - begin)
            pid = int((daemon.data_dir / "dmgn-node.pid").read_text().split()[0])
            cpu_before = process_cpu_s(pid)
            start = time.perf_counter()
            command = ["add", "--jsonl", str(source), "--json", "--data-dir", str(daemon.data_dir)]
            running = subprocess.Popen(
                [*daemon.dmgn, *command],
                env=daemon.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            during: list[float] = []
            failed_status = 0
            while running.poll() is None:
                begin = time.perf_counter()
                shown = daemon.cli("status", "--json", check=False)
                if running.poll() is None:  # only those wholly inside the import
                    during.append(time.perf_counter() - begin)
                    failed_status += shown.returncode != 0
                    time.sleep(0.5)  # a person's pace: the polling must not slow the import
            stdout, stderr = running.communicate()
            acknowledged = time.perf_counter() - start
            if running.returncode != 0:
                out[embedder] = {"error": (stderr or stdout).strip()[:300]}
                continue
            summary = json.loads(stdout)
            indexed = 0
            while time.perf_counter() - start < acknowledged + 600:
                shown = daemon.cli("status", "--json", check=False)
                if shown.returncode == 0:
                    indexed = json.loads(shown.stdout)["index"]["memories"]
                    if indexed >= count:
                        break
                time.sleep(0.2)
            searchable = time.perf_counter() - start
            daemon_cpu = process_cpu_s(pid) - cpu_before
            out[embedder] = {
                "acknowledged_s": round(acknowledged, 2),
                "searchable_s": round(searchable, 2),
                "memories_per_s": round(count / searchable, 1),
                "acknowledged_per_s": round(count / acknowledged, 1),
                "added": summary.get("added"),
                "failed": len(summary.get("failed", [])),
                "indexed_after": indexed,
                "daemon_cpu_s": round(daemon_cpu, 2),
                "daemon_cpu_ms_per_memory": round(daemon_cpu * 1000 / count, 3),
                "status_idle_p50_s": round(statistics.median(idle), 2),
                "status_during_import_s": {
                    "runs": len(during),
                    "failed": failed_status,
                    "p50": round(statistics.median(during), 2) if during else None,
                    "max": round(max(during), 2) if during else None,
                },
            }
        print("bulk", embedder, out[embedder], flush=True)
    return out


def status_section(root: Path, runs: int) -> dict[str, Any]:
    with Daemon(root / "status", "hashing") as daemon:
        commands = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "dmgn status (daemon)": [
                *daemon.dmgn,
                "status",
                "--data-dir",
                str(daemon.data_dir),
                "--json",
            ],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for cmd in commands.values():  # warm-up (page cache, .pyc)
            for _ in range(2):
                subprocess.run(cmd, env=daemon.env, capture_output=True, check=True)
        for _ in range(runs):
            for name, cmd in commands.items():
                start = time.perf_counter()
                subprocess.run(cmd, env=daemon.env, capture_output=True, check=True)
                times[name].append((time.perf_counter() - start) * 1000)
    out: dict[str, Any] = {
        name: {
            "mean_ms": round(statistics.fmean(t), 1),
            "min_ms": round(min(t), 1),
            "p50_ms": round(percentile(t, 50), 1),
            "runs": len(t),
        }
        for name, t in times.items()
    }
    out["status_minus_python_p50_ms"] = round(
        out["dmgn status (daemon)"]["p50_ms"] - out["python -c pass"]["p50_ms"], 1
    )
    print("status", out, flush=True)
    return out


# -- long memories -----------------------------------------------------------------------------

FILLER = [
    "The committee reviewed the quarterly budget and approved the printer lease.",
    "Traffic on the ring road was slow because of roadworks near the stadium.",
    "We discussed the font of the newsletter header for far too long.",
    "Someone suggested moving the weekly sync to a shorter slot in the morning.",
    "The spreadsheet of office supplies was updated with staples and folders.",
    "The wifi in the meeting room dropped twice during the presentation.",
    "Lunch was sandwiches again, and the coffee machine needed descaling.",
    "A reminder went out about labelling food in the shared fridge.",
    "The slides were shared after the call, with the action items at the end.",
    "Facilities will repaint the corridor on the third floor next month.",
    "Several people asked whether the parking permits would be renewed.",
    "The project tracker now has a column for items waiting on legal review.",
    "We agreed to revisit the onboarding checklist at the next retrospective.",
    "The fire drill is scheduled for a Tuesday, details to follow.",
    "The team photo will be taken outside if the weather holds.",
    "An intern volunteered to tidy up the shared drive folders.",
]

#: (fact, question) templates: the question shares no content word with the fact.
FACTS = [
    ("{n} adopted a beagle puppy from the animal shelter.", "which pet did {n} get"),
    ("{n} is severely allergic to peanuts and carries an EpiPen.", "does {n} have a nut allergy"),
    ("{n}'s flight to Lisbon leaves on the ninth of October.", "when does {n} travel to Portugal"),
    ("{n} started a new job as a nurse at the city hospital.", "where does {n} work now"),
    ("{n} practises the cello every evening after dinner.", "what instrument does {n} play"),
    ("{n} sold the old Honda and bought an electric car.", "what vehicle does {n} drive"),
    ("{n}'s daughter was born on the second of May.", "when did {n} become a parent"),
    ("{n} is training for the Berlin marathon in autumn.", "what race is {n} running"),
    ("{n} moved into a flat near the river in Leeds.", "where does {n} live"),
    ("{n} became vegetarian after a trip to India.", "does {n} eat meat"),
    ("{n} broke a wrist falling off a bicycle.", "how did {n} get injured"),
    ("{n} is learning Japanese with an evening course.", "which language is {n} studying"),
]
NAMES = [
    "Tom", "Priya", "Lena", "Marco", "Aisha", "Jonas", "Mei", "Oscar", "Fatima", "Luca",
    "Sofia", "Ravi", "Nina", "Hugo", "Yara", "Felix", "Ines", "Omar", "Greta", "Diego",
]  # fmt: skip


def long_section(docs: int, seed: int = 17) -> dict[str, Any]:
    from actors._index_core import BUILTIN, Entry, SearchIndex
    from dmgn.embedding import MINILM_MAX_TOKENS, MiniLMEmbedder

    rng = random.Random(seed)
    model = MiniLMEmbedder()
    items = []
    for d in range(docs):
        fact, question = FACTS[d % len(FACTS)]
        name = NAMES[(d // len(FACTS)) % len(NAMES)]
        body = [rng.choice(FILLER) for _ in range(rng.randint(25, 70))]
        depth = rng.randint(0, len(body))
        body.insert(depth, fact.format(n=name))
        text = " ".join(body)
        prefix = " ".join(body[: depth + 1])
        fact_end = len(model._tokenizer.encode(prefix).ids)
        items.append((f"{d:064x}", text, question.format(n=name), fact_end))
    results: dict[str, Any] = {"documents": docs}
    start = time.perf_counter()
    vectors_first = model.embed([t for _, t, _, _ in items])
    results["embed_first_window_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    windows, owners = model.embed_windows([t for _, t, _, _ in items])
    results["embed_windows_s"] = round(time.perf_counter() - start, 2)
    results["rows_per_memory"] = round(len(owners) / docs, 2)
    questions = model.embed([q for _, _, q, _ in items])
    for mode in ("before: one vector (first 256 word pieces)", "after: sentence windows"):
        index = SearchIndex(model.name, model.dim)
        entries = []
        for i, (memory_id, text, _, _) in enumerate(items):
            if mode.startswith("before"):
                vec = vectors_first[i]
            else:
                vec = windows[[r for r, o in enumerate(owners) if o == i]]
            entries.append(Entry(memory_id, text, "document", i, vec, None))
        index.add(entries)
        hits_all = hits_deep = deep = 0
        for i, (memory_id, _, question, fact_end) in enumerate(items):
            found = index.search(
                text=question, query_vector=questions[i], space=BUILTIN, alpha=1.0, limit=5
            )
            hit = memory_id in {s.memory_id for s in found}
            hits_all += hit
            if fact_end > MINILM_MAX_TOKENS - 1:
                deep += 1
                hits_deep += hit
        results[mode] = {
            "recall@5": round(hits_all / docs, 3),
            "recall@5 (fact past 256 word pieces)": round(hits_deep / max(deep, 1), 3),
            "facts past 256 word pieces": deep,
        }
        print("long", mode, results[mode], flush=True)
    return results


# -- report ----------------------------------------------------------------------------------


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# benchmarks/embedding.py",
        "",
        f"Run {report['when']} on {report['machine']}. Load = two separate Python processes "
        "doing numpy matrix products (default OpenBLAS threads) beside the measured code.",
        "",
    ]
    emb = report.get("embedding")
    if emb:
        lines += [
            "## Embedding (all-MiniLM-L6-v2)",
            "",
            f"BLAS: {emb['blas']}. Batch = {emb['batch_texts']} short texts in one call. "
            f"Machine load average when the section started: {emb.get('load_average_at_start')} "
            '(other sessions share these 2 cores: "quiet" is only without our two load '
            "processes).",
            "",
            "| backend | case | single p50 ms | single p99 ms | batch texts/s |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for name, cases in emb["results"].items():
            for case, r in cases.items():
                lines.append(
                    f"| {name} | {case} | {r['p50_ms']} | {r['p99_ms']} | {r['texts_per_s']} |"
                )
        lines.append("")
        names = list(emb["results"])
        base = emb["results"][names[0]]
        for name in names[1:]:
            r = emb["results"][name]
            quiet = base["quiet"]["p50_ms"] / r["quiet"]["p50_ms"]
            loaded = base["load"]["p50_ms"] / r["load"]["p50_ms"]
            own = r["load"]["p50_ms"] / r["quiet"]["p50_ms"]
            lines.append(
                f"- {name}: single p50 {quiet:.1f}x faster than {names[0]} quiet, "
                f"{loaded:.1f}x under load; its own load/quiet p50 {own:.1f}x"
            )
        lines.append("")
    mcp = report.get("mcp")
    if mcp:
        lines += [
            "## Through MCP, model on (daemon + MCP SDK client)",
            "",
            f"Backend: {mcp.get('backend')}. Load average at start: "
            f"{mcp.get('load_average_at_start')}.",
            "",
            "| tool | quiet p50 | quiet p99 | load p50 | load p99 | load/quiet p50 |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for tool in ("add_memory", "query_memory"):
            q, ld = mcp["quiet"][tool], mcp["load"][tool]
            lines.append(
                f"| {tool} | {q['p50_ms']} | {q['p99_ms']} | {ld['p50_ms']} | {ld['p99_ms']} | "
                f"{mcp[f'{tool}_load_over_quiet_p50']}x |"
            )
        lines.append("")
    goals = []
    if mcp:
        for tool, limit in (("add_memory", 25.0), ("query_memory", 20.0)):
            ratio = mcp[f"{tool}_load_over_quiet_p50"]
            quiet = mcp["quiet"][tool]["p50_ms"]
            ratio_met = "met" if ratio <= 3 else "NOT met"
            quiet_met = "met" if quiet <= limit else "NOT met"
            goals.append(
                f"- {tool}: load/quiet p50 {ratio}x (goal ≤ 3x: {ratio_met}); "
                f"quiet p50 {quiet} ms (goal ≤ {limit:g} ms: {quiet_met})"
            )
    bulk = report.get("bulk") or {}
    for embedder, goal in (("model", 150.0), ("hashing", 2000.0)):
        row = bulk.get(embedder) or {}
        rate = row.get("memories_per_s")
        if rate is not None:
            met = "met" if rate >= goal else "NOT met"
            during = row.get("status_during_import_s") or {}
            goals.append(
                f"- bulk import of {bulk['memories']}, {embedder}: {rate}/s until all searchable "
                f"({row.get('acknowledged_per_s')}/s acknowledged; goal ≥ {goal:g}/s: {met}; "
                f"daemon CPU {row.get('daemon_cpu_ms_per_memory')} ms a memory); "
                f"`dmgn status` during it p50 {during.get('p50')} s, max {during.get('max')} s "
                f"(idle {row.get('status_idle_p50_s')} s)"
            )
    status = report.get("status")
    if status:
        over = status["status_minus_python_p50_ms"]
        goals.append(
            f"- dmgn status through the daemon: {over} ms over `python -c pass` "
            f"(goal ≤ 150 ms: {'met' if over <= 150 else 'NOT met'})"
        )
    if goals:
        lines += ["## Against the issue's targets", "", *goals, ""]
    for key, title in (("bulk", "Bulk import"), ("status", "CLI start-up"), ("long", "Long")):
        if key in report:
            lines += [f"## {title}", "", "```json", json.dumps(report[key], indent=2), "```", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--bulk", type=int, default=10_000)
    parser.add_argument("--docs", type=int, default=240)
    parser.add_argument("--batch", type=int, default=256, help="texts per batch (embedding)")
    args = parser.parse_args()
    sections = args.only or ["long", "embedding", "mcp", "status", "bulk"]
    path = args.out / "embedding.json"
    report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    report.update(
        when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine=f"{os.cpu_count()} cores, load average before {os.getloadavg()[0]:.1f}",
    )
    root = Path(tempfile.mkdtemp(prefix="dmgn-bench-", dir="/tmp"))
    try:
        runners: dict[str, Callable[[], dict[str, Any]]] = {
            "long": lambda: long_section(args.docs),
            "embedding": lambda: embedding_section(args.runs, args.batch),
            "mcp": lambda: mcp_section(root, args.runs, args.runs),
            "status": lambda: status_section(root, 10),
            "bulk": lambda: bulk_section(root, args.bulk),
        }
        for name, run in runners.items():
            if name in sections:
                load = round(os.getloadavg()[0], 1)
                report[name] = {"load_average_at_start": load, **run()}
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(report, indent=2) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "embedding.md").write_text(markdown(report))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
