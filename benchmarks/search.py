"""Search benchmark: ingest rate, query latency, memory, ANN recall, and brute-force ratios.

    .venv/bin/python benchmarks/search.py                 # N = 10k and 100k (~6 min on 2 cores)
    .venv/bin/python benchmarks/search.py --sizes 2000    # a quick look

Writes ``benchmarks/out/search.json`` and ``.md`` (``--out benchmarks/results/search`` to
replace the committed results).

What is measured, all through the indexer actor (``call`` + worker thread, as the node uses it):
* ingest: memories/s for batches of 512 ``Index`` messages, embedding included, with the lexical
  (hashing) embedder at every N; the model embedder's rate on a sample (``--model-sample``),
  because embedding 100k memories with it takes ~15 min on two cores and tells nothing new;
* query latency p50/p99 for text (alpha 0), vector (alpha 1) and hybrid (alpha 0.5) queries;
  the model's own per-query embedding time is reported beside it (add it for model latency);
* the same queries answered by a brute-force numpy scan (every vector dotted, every posting of
  the query terms summed), as brute/indexed ratios in the same run;
* ANN recall@10 of the vector index against exact search over the same vectors;
* resident memory growth during ingest and the index's own estimate of its size.

Memories are synthetic but shaped like an agent's: chat turns, notes and observations built from
templates with people, places, projects, numbers and a Zipf-distributed general vocabulary, so
posting lists and vector neighbourhoods have realistic skew (uniform random text would make both
look unrealistically good or bad).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import trio
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors._index_text import K1, B, tokenize
from actors.indexer import Hit, Index, IndexerActor, IndexItem, Search, Stats
from actors.runtime import Ok, Result, call
from dmgn.embedding import Embedder, HashingEmbedder, MiniLMEmbedder

#: Where runs go unless --out says otherwise (gitignored): a run never overwrites tracked files.
OUT = Path(__file__).resolve().parent / "out"
BATCH = 512

# -- synthetic memories ---------------------------------------------------------------------

PEOPLE = [
    "Alice",
    "Bob",
    "Carmen",
    "Dmitri",
    "Esther",
    "Farid",
    "Grace",
    "Hiro",
    "Ingrid",
    "Jamal",
    "Keiko",
    "Luca",
    "Maya",
    "Nikolai",
    "Olga",
    "Priya",
    "Quentin",
    "Rosa",
    "Sami",
    "Tomás",
    "Uma",
    "Viktor",
    "Wen",
    "Ximena",
    "Yusuf",
    "Zoe",
]
PLACES = [
    "Lisbon",
    "the office",
    "Berlin",
    "the gym",
    "Kyoto",
    "the cafe on 5th",
    "Montreal",
    "grandma's house",
    "the lake cabin",
    "Nairobi",
    "the coworking space",
    "Oslo",
    "the farmers market",
    "Buenos Aires",
    "the dentist",
    "the library",
]
PROJECTS = [
    "billing migration",
    "mobile app redesign",
    "Q3 roadmap",
    "data pipeline",
    "onboarding flow",
    "search relevance",
    "kitchen renovation",
    "garden plan",
    "thesis draft",
    "wedding planning",
    "tax return",
    "marathon training",
]
FOODS = [
    "ramen",
    "tacos al pastor",
    "paella",
    "sourdough",
    "pho",
    "butter chicken",
    "sushi",
    "falafel",
    "pierogi",
    "ceviche",
    "khachapuri",
    "bibimbap",
]
TOPICS = [
    "budget",
    "deadline",
    "bug",
    "invoice",
    "flight",
    "appointment",
    "recipe",
    "song",
    "book",
    "password",
    "allergy",
    "workout",
    "meeting",
    "contract",
    "apartment",
    "vaccine",
    "podcast",
    "camera",
    "bike",
    "plant",
    "lease",
    "salary",
    "insurance",
]
VERBS = [
    "mentioned",
    "decided",
    "asked",
    "promised",
    "complained",
    "noticed",
    "suggested",
    "confirmed",
    "forgot",
    "remembered",
    "planned",
    "cancelled",
]
GENERAL = (  # noqa: SIM905 (prose reads better than 200 quoted words)
    "time year people way day man thing woman life child world school state family "
    "student group country problem hand part place case week company system program "
    "question work government number night point home water room mother area money "
    "story fact month lot right study book eye job word business issue side kind head "
    "house service friend father power hour game line end member law car city "
    "community name president team minute idea kid body information back parent face "
    "others level office door health person art war history party result change "
    "morning reason research girl guy moment air teacher force education foot boy age "
    "policy music market sense nation plan college interest death experience effect "
    "class control care field development role effort rate heart drug show leader "
    "light voice wife police mind price report decision son view relationship town "
    "road arm difference value building action model season society tax director "
    "position player record paper space ground form event official matter center "
    "couple site project activity star table need court oil situation cost industry "
    "figure street image phone data picture practice piece land product doctor wall "
    "patient worker news test movie north love support technology step baby computer "
    "type attention film tree source organization hair window evidence population "
    "site training quality"
).split()


def _zipf_words(rng: random.Random, k: int) -> list[str]:
    return [GENERAL[min(int(rng.paretovariate(1.1)) - 1, len(GENERAL) - 1)] for _ in range(k)]


def synthetic_text(rng: random.Random, i: int) -> tuple[str, str]:
    """(type, text) of one memory."""
    who, other = rng.sample(PEOPLE, 2)
    topic = rng.choice(TOPICS)
    filler = " ".join(_zipf_words(rng, rng.randint(4, 14)))
    kind = rng.randrange(6)
    if kind == 0:
        return "conversation", (
            f"user: {who} {rng.choice(VERBS)} the {topic} for the {rng.choice(PROJECTS)} "
            f"is due {rng.choice(['Monday', 'Friday', 'next week', 'end of month'])}. "
            f"assistant: Noted, I'll remind you. {filler}"
        )
    if kind == 1:
        return "text", (
            f"Had {rng.choice(FOODS)} at {rng.choice(PLACES)} with {other}; "
            f"{who} {rng.choice(VERBS)} the {topic}. {filler}"
        )
    if kind == 2:
        return "observation", (
            f"Ticket INC-{rng.randint(1000, 99999)}: {topic} error in the "
            f"{rng.choice(PROJECTS)} after {who}'s change. {filler}"
        )
    if kind == 3:
        return "conversation", (
            f"user: remind me that {who}'s birthday is "
            f"{rng.choice(['March', 'June', 'October'])} {rng.randint(1, 28)}"
            f", they love {rng.choice(FOODS)}. assistant: Saved. {filler}"
        )
    if kind == 4:
        return "document", (
            f"Meeting notes #{i}: {who} and {other} discussed the {topic} and "
            f"the {rng.choice(PROJECTS)} at {rng.choice(PLACES)}. {filler}"
        )
    return "text", f"{who} {rng.choice(VERBS)} something about the {topic}: {filler}"


def synthetic_memories(n: int, seed: int = 7) -> list[IndexItem]:
    rng = random.Random(seed)
    start = 1_700_000_000 * 10**9
    items = []
    for i in range(n):
        type_, text = synthetic_text(rng, i)
        memory_id = hashlib.sha256(f"{seed}/{i}".encode()).hexdigest()
        items.append(IndexItem(memory_id, text, type_, start + i * 60 * 10**9))
    return items


def synthetic_queries(memories: Sequence[IndexItem], n: int, seed: int = 11) -> list[str]:
    """2–4 content words of a random memory, sometimes with a word it does not contain."""
    rng = random.Random(seed)
    queries = []
    for _ in range(n):
        words = [
            w
            for w in memories[rng.randrange(len(memories))].text.split()
            if w.isalpha() and len(w) > 3
        ]
        picked = rng.sample(words, min(len(words), rng.randint(2, 4)))
        if rng.random() < 0.3:
            picked.append(rng.choice(GENERAL))
        queries.append(" ".join(picked))
    return queries


# -- brute force ----------------------------------------------------------------------------


class BruteForce:
    """What the reference does (and a bit more): score every memory on every query."""

    def __init__(self, memories: Sequence[IndexItem], vectors: NDArray[np.float32]) -> None:
        self.vectors = vectors
        self.vocab: dict[str, int] = {}
        terms, tfs, docs = [], [], []
        lengths = np.zeros(len(memories), dtype=np.float32)
        for doc, memory in enumerate(memories):
            counts = Counter(tokenize(memory.text))
            lengths[doc] = sum(counts.values())
            for term, tf in counts.items():
                terms.append(self.vocab.setdefault(term, len(self.vocab)))
                tfs.append(tf)
                docs.append(doc)
        self.terms = np.array(terms, dtype=np.int32)
        self.tfs = np.array(tfs, dtype=np.float32)
        self.docs = np.array(docs, dtype=np.int64)
        self.lengths = lengths
        self.df = np.bincount(self.terms, minlength=len(self.vocab))
        self.n = len(memories)

    def text(self, query: str) -> NDArray[np.float32]:
        wanted = [self.vocab[t] for t in set(tokenize(query)) if t in self.vocab]
        hits = np.isin(self.terms, wanted)
        terms, tfs, docs = self.terms[hits], self.tfs[hits], self.docs[hits]
        idf = np.log(1.0 + (self.n - self.df[terms] + 0.5) / (self.df[terms] + 0.5))
        norm = K1 * (1.0 - B + B * self.lengths[docs] / self.lengths.mean())
        parts = idf * tfs * (K1 + 1.0) / (tfs + norm)
        ideal = (
            float(np.log(1.0 + (self.n - self.df[wanted] + 0.5) / (self.df[wanted] + 0.5)).sum())
            or 1.0
        )
        scores: NDArray[np.float32] = np.minimum(
            np.bincount(docs, weights=parts, minlength=self.n) / ideal, 1.0
        ).astype(np.float32)
        return scores

    def vector(self, query: NDArray[np.float32]) -> NDArray[np.float32]:
        scores: NDArray[np.float32] = np.clip(np.einsum("ij,j->i", self.vectors, query), 0.0, 1.0)
        return scores

    @staticmethod
    def top(scores: NDArray[np.float32], k: int = 10) -> NDArray[np.int64]:
        part = np.argpartition(-scores, k)[:k]
        ordered: NDArray[np.int64] = part[np.argsort(-scores[part])]
        return ordered


# -- measuring ------------------------------------------------------------------------------


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(
            ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)] * 1000, 3
        ),
    }


async def _ask(actor: IndexerActor, make: Callable[[Any], Any]) -> Any:
    result: Result[Any] = await call(actor.mailbox.address, make, timeout=600)
    if not isinstance(result, Ok):
        raise RuntimeError(result.reason)
    return result.value


async def ingest(actor: IndexerActor, memories: Sequence[IndexItem]) -> float:
    started = time.perf_counter()
    for start in range(0, len(memories), BATCH):
        batch = tuple(memories[start : start + BATCH])
        await _ask(actor, lambda r, b=batch: Index(b, r))
    return len(memories) / (time.perf_counter() - started)


async def query_latencies(
    actor: IndexerActor, queries: Sequence[str], alpha: float
) -> tuple[list[float], list[list[Hit]]]:
    latencies, answers = [], []
    for q in queries:
        started = time.perf_counter()
        hits: list[Hit] = await _ask(
            actor, lambda r, q=q: Search(reply=r, text=q, alpha=alpha, limit=10)
        )
        latencies.append(time.perf_counter() - started)
        answers.append(hits)
    return latencies, answers


def brute_latencies(
    brute: BruteForce, embedder: Embedder, queries: Sequence[str], alpha: float
) -> list[float]:
    latencies = []
    for q in queries:
        started = time.perf_counter()
        if alpha == 0.0:
            scores = brute.text(q)
        elif alpha == 1.0:
            scores = brute.vector(embedder.embed([q])[0])
        else:
            scores = alpha * brute.vector(embedder.embed([q])[0]) + (1 - alpha) * brute.text(q)
        brute.top(scores)
        latencies.append(time.perf_counter() - started)
    return latencies


async def bench_size(n: int, n_queries: int) -> dict[str, Any]:
    embedder = HashingEmbedder()
    memories = synthetic_memories(n)
    queries = synthetic_queries(memories, n_queries)
    rss_before = _rss_bytes()
    actor = IndexerActor(embedder)
    out: dict[str, Any] = {"n": n, "embedder": embedder.name}
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        out["ingest_per_s"] = round(await ingest(actor, memories), 1)
        stats = await _ask(actor, Stats)
        out["index_kind"] = stats.spaces[0].kind
        out["index_bytes"] = stats.approx_bytes
        out["rss_growth_bytes"] = _rss_bytes() - rss_before
        space = actor._index.spaces()["builtin"]  # benchmark peeks; nothing else may
        vectors = np.array(space.rows_of(np.arange(n, dtype=np.int64))[0])  # one row each
        brute = BruteForce(memories, vectors)
        for mode, alpha in (("text", 0.0), ("vector", 1.0), ("hybrid", 0.5)):
            await query_latencies(actor, queries[:20], alpha)  # warm caches
            latencies, _ = await query_latencies(actor, queries, alpha)
            brute_times = brute_latencies(brute, embedder, queries, alpha)
            indexed, scanned = _percentiles(latencies), _percentiles(brute_times)
            out[mode] = {
                **indexed,
                "brute_p50_ms": scanned["p50_ms"],
                "brute_p99_ms": scanned["p99_ms"],
                "speedup_p50": round(scanned["p50_ms"] / indexed["p50_ms"], 1),
            }
        query_vectors = embedder.embed(queries)
        recalls = []
        for qv in query_vectors:
            exact, _ = space.exact(qv, None, 10)
            approx, _ = space.approximate(qv, 10)
            recalls.append(len(set(exact.tolist()) & set(approx.tolist())) / 10)
        out["ann_recall_at_10"] = round(float(np.mean(recalls)), 4)
        nursery.cancel_scope.cancel()
    return out


async def bench_model(sample: int, n_queries: int) -> dict[str, Any]:
    embedder = MiniLMEmbedder()
    memories = synthetic_memories(sample, seed=99)
    queries = synthetic_queries(memories, n_queries, seed=5)
    actor = IndexerActor(embedder)
    out: dict[str, Any] = {"n": sample, "embedder": embedder.name}
    async with trio.open_nursery() as nursery:
        await nursery.start(actor.run)
        out["ingest_per_s"] = round(await ingest(actor, memories), 1)
        embed_times = []
        for q in queries:
            started = time.perf_counter()
            embedder.embed([q])
            embed_times.append(time.perf_counter() - started)
        out["query_embedding"] = _percentiles(embed_times)
        await query_latencies(actor, queries[:10], 0.5)  # warm caches
        latencies, _ = await query_latencies(actor, queries, 0.5)
        out["hybrid"] = _percentiles(latencies)
        nursery.cancel_scope.cancel()
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| N | embedder | index | ingest/s | text p50 / p99 ms | vector p50 / p99 ms "
        "| hybrid p50 / p99 ms | brute-force p50 ms (text / vector / hybrid) "
        "| speed-up vs brute (text / vector / hybrid) | ANN recall@10 | RSS growth MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["sizes"]:
        t, v, h = r["text"], r["vector"], r["hybrid"]
        lines.append(
            f"| {r['n']:,} | {r['embedder']} | {r['index_kind']} | {r['ingest_per_s']:,.0f} "
            f"| {t['p50_ms']} / {t['p99_ms']} | {v['p50_ms']} / {v['p99_ms']} "
            f"| {h['p50_ms']} / {h['p99_ms']} "
            f"| {t['brute_p50_ms']} / {v['brute_p50_ms']} / {h['brute_p50_ms']} "
            f"| {t['speedup_p50']}× / {v['speedup_p50']}× / {h['speedup_p50']}× "
            f"| {r['ann_recall_at_10']} | {r['rss_growth_bytes'] / 2**20:,.0f} |"
        )
    m = report.get("model")
    if m:
        lines += [
            "",
            f"Model embedder ({m['embedder']}, numpy forward pass) on {m['n']:,} memories: "
            f"ingest {m['ingest_per_s']:,.0f} memories/s; query embedding p50 "
            f"{m['query_embedding']['p50_ms']} ms; hybrid query p50 / p99 "
            f"{m['hybrid']['p50_ms']} / {m['hybrid']['p99_ms']} ms (embedding included).",
        ]
    lines += [
        "",
        f"Machine: {report['machine']}; 1-min load average at start "
        f"{report['load_average_at_start']:.1f}. Queries per mode: {report['queries']}.",
    ]
    return "\n".join(lines) + "\n"


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import os
    import platform

    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}",
        # Latencies are only comparable on a quiet machine: say how busy it was.
        "load_average_at_start": os.getloadavg()[0],
        "queries": args.queries,
        "sizes": [],
    }
    for n in args.sizes:
        print(f"N={n:,} ...", flush=True)
        report["sizes"].append(await bench_size(n, args.queries))
        print(json.dumps(report["sizes"][-1]), flush=True)
    if args.model_sample:
        print(f"model embedder on {args.model_sample} memories ...", flush=True)
        report["model"] = await bench_model(args.model_sample, min(args.queries, 100))
        print(json.dumps(report["model"]), flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--model-sample", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=OUT / "search", help="written as OUT.json, .md")
    args = parser.parse_args()
    report = trio.run(main_async, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
