"""Retrieval quality on a generated conversational-memory set: recall@5 / recall@10.

    .venv/bin/python benchmarks/quality.py    # ~2 min on 2 cores (the model embeds ~3.6k turns)

Writes ``benchmarks/out/search.quality.json`` and ``.md`` (``--out
benchmarks/results/search.quality`` to replace the committed results).

The set imitates what the held-back evaluation is described as: long multi-session chats between
a user and an assistant, every turn stored as a memory, and questions about facts the user stated
once; the answer's evidence is that one turn. Each "user" (haystack) gets:

* ~30 facts about themselves, each stated once in a natural turn of some session;
* hard negatives: the same kind of fact about someone else ("my sister adopted a cat"), and the
  assistant's reply to the fact, which repeats its topic without being the evidence;
* lots of ordinary chatter from both sides, across sessions.

Each fact is asked two or three times: once paraphrased with no content word in common with the
statement ("What is my dog called?" for "we brought home a beagle puppy, the kids named him
Biscuit"), once directly, sharing some words ("What did the kids name the puppy from the
shelter?"), as most questions in public conversational-memory sets do, and, when the statement
names something (a name, a code), by that name alone ("What did I tell you about Biscuit?").
Nothing is tuned per question: one global setting per mode is reported.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from actors._index_core import BUILTIN, Entry, SearchIndex
from dmgn.embedding import Embedder, HashingEmbedder, MiniLMEmbedder

#: Where runs go unless --out says otherwise (gitignored): a run never overwrites tracked files.
OUT = Path(__file__).resolve().parent / "out"


@dataclass(frozen=True)
class Fact:
    statement: str  # said by the user; {slots} filled from values
    questions: tuple[str, ...]
    values: dict[str, tuple[str, ...]]
    other: str  # the same kind of fact about someone else (hard negative)


FACTS = [
    Fact(
        "We finally brought home a {breed} puppy from the shelter, the kids named him {name}.",
        ("What is my dog called?", "What breed is our new pet?"),
        {
            "breed": ("beagle", "corgi", "labrador", "dachshund", "husky"),
            "name": ("Biscuit", "Pepper", "Rocket", "Waffles", "Ziggy"),
        },
        "My neighbour just got a {breed} too, she calls it {name}.",
    ),
    Fact(
        "Good news: I accepted the offer, I'll be a {job} at {company} from next month.",
        ("Where am I going to work?", "What position did I take?"),
        {
            "job": ("data analyst", "pediatric nurse", "product designer", "paralegal"),
            "company": ("Northwind", "Acme Robotics", "Bluefin Health", "Orbital Foods"),
        },
        "My cousin works as a {job} at {company}, she hates it.",
    ),
    Fact(
        "I can't eat anything with {food} in it, I break out in hives.",
        ("What am I allergic to?", "Which ingredient should I avoid?"),
        {"food": ("peanuts", "shellfish", "sesame", "kiwi", "strawberries")},
        "Our guest said {food} make him sick, so I changed the menu.",
    ),
    Fact(
        "I grew up in {city} and moved away when I turned eighteen.",
        ("Where is my hometown?", "In which city did I spend my childhood?"),
        {"city": ("Porto", "Winnipeg", "Adelaide", "Gdansk", "Tucson")},
        "My boss is from {city}, he talks about it constantly.",
    ),
    Fact(
        "My younger brother just started a PhD in {field} at {uni}.",
        ("What is my brother studying?", "Where is my sibling doing his doctorate?"),
        {
            "field": ("marine biology", "astrophysics", "linguistics", "epidemiology"),
            "uni": ("Edinburgh", "McGill", "ETH Zurich", "Kyoto University"),
        },
        "A friend of mine dropped out of a {field} program at {uni}.",
    ),
    Fact(
        "I traded in the old sedan for a {car} last Saturday.",
        ("What vehicle do I drive now?", "Which car did I buy?"),
        {"car": ("Subaru Outback", "Kia EV6", "Volvo XC40", "Mazda Miata")},
        "My dad keeps talking about buying a {car} someday.",
    ),
    Fact(
        "I've been taking {instrument} lessons every Tuesday evening.",
        ("Which musical instrument am I learning?", "What do I do on Tuesday nights?"),
        {"instrument": ("cello", "saxophone", "ukulele", "piano", "drums")},
        "The kid next door practises the {instrument} at 7am, it's awful.",
    ),
    Fact(
        "We booked flights to {city} for our anniversary in {month}.",
        ("Where are we travelling to celebrate being married?", "When is our anniversary trip?"),
        {
            "city": ("Lisbon", "Reykjavik", "Hanoi", "Marrakech", "Vancouver"),
            "month": ("October", "May", "February", "August"),
        },
        "My colleague just came back from {city}, she loved it.",
    ),
    Fact(
        "I just reread {book} for the fourth time, it's still my favourite novel.",
        ("What's my favorite book?", "Which story do I keep going back to?"),
        {"book": ("Middlemarch", "Dune", "The Remains of the Day", "Beloved", "Pachinko")},
        "Book club picked {book} this month, not my choice.",
    ),
    Fact(
        "I went {diet} about three months ago and honestly feel great.",
        ("What kind of eating plan do I follow?", "Did I change how I eat?"),
        {"diet": ("vegan", "pescatarian", "gluten-free", "keto")},
        "My roommate tried going {diet} but gave up after a week.",
    ),
    Fact(
        "Finished the {race} in {duration}, a personal best!",
        ("How fast did I run my last race?", "What was my finishing time?"),
        {
            "race": ("Berlin half marathon", "city 10k", "Chicago marathon"),
            "duration": ("1:52", "48 minutes", "3:41", "2:05"),
        },
        "My friend ran the {race} too but had to stop halfway.",
    ),
    Fact(
        "Signed the lease on a two-bedroom flat in {area}, moving on the 1st.",
        ("Where is my new apartment?", "Which neighborhood am I moving to?"),
        {"area": ("Kreuzberg", "Brooklyn Heights", "Le Marais", "Shimokitazawa")},
        "Rents in {area} are insane, my friend pays twice what I do.",
    ),
    Fact(
        "My wife {name} works night shifts as an {job}.",
        ("What does my spouse do for a living?", "What's my partner's profession?"),
        {
            "name": ("Ana", "Priya", "Hannah", "Mei"),
            "job": ("ER physician", "air traffic controller", "ICU nurse", "emergency dispatcher"),
        },
        "My aunt used to be an {job} before she retired.",
    ),
    Fact(
        "I'm practising {language} on my phone every morning before work.",
        ("Which foreign language am I learning?", "What am I studying before my job?"),
        {"language": ("Portuguese", "Korean", "Turkish", "Italian", "Swahili")},
        "My manager speaks fluent {language}, which is impressive.",
    ),
    Fact(
        "Our daughter starts kindergarten at {school} in September.",
        ("Which school will my kid attend?", "Where is my child going in the fall?"),
        {"school": ("Maple Grove Elementary", "Riverside Montessori", "Oak Hill Academy")},
        "The neighbours' son goes to {school}, they like it.",
    ),
    Fact(
        "The doctor put me on {med} for my blood pressure.",
        ("What medication was I prescribed?", "What pills do I take for hypertension?"),
        {"med": ("lisinopril", "amlodipine", "losartan")},
        "My grandfather takes {med} too, and complains about it.",
    ),
    Fact(
        "I switched to {drink} because coffee was making me jittery.",
        (
            "What do I drink instead of caffeine-heavy drinks now?",
            "Why did I stop having espresso?",
        ),
        {"drink": ("matcha", "rooibos tea", "chicory", "yerba mate")},
        "The cafe downstairs started selling {drink}, everyone's into it.",
    ),
    Fact(
        "My birthday is on {month} {day}, planning a small dinner this year.",
        ("When was I born?", "What date should you remember to congratulate me?"),
        {"month": ("March", "July", "November", "January"), "day": ("3", "14", "22", "29")},
        "My sister's birthday is {month} {day}, I always forget it.",
    ),
    Fact(
        "I bought a {plant} for the balcony and it's already flowering.",
        ("What did I grow outside?", "Which plant is on my terrace?"),
        {"plant": ("bougainvillea", "jasmine", "hibiscus", "lemon tree")},
        "My mum has a huge {plant} in her garden.",
    ),
    Fact(
        "Been playing {game} every night with my cousin online.",
        ("What video game have I been into lately?", "What do I do for fun in the evenings?"),
        {"game": ("Stardew Valley", "Elden Ring", "Rocket League", "Civilization VI")},
        "My students won't stop talking about {game}.",
    ),
    Fact(
        "I've supported {team} since I was a kid, never missed a home match.",
        ("Which sports club do I root for?", "Who's my favourite team?"),
        {"team": ("Celtic", "the Boston Red Sox", "Boca Juniors", "the Toronto Raptors")},
        "My father-in-law is a {team} fan, unfortunately.",
    ),
    Fact(
        "Dropped my phone in the lake; ordered a {phone} as a replacement.",
        ("What new mobile did I purchase?", "What happened to my old handset?"),
        {"phone": ("Pixel 9", "iPhone 16", "Fairphone 5", "Galaxy S24")},
        "A coworker showed me her {phone}, the camera is great.",
    ),
    Fact(
        "Joined the bouldering gym near {place}, going twice a week now.",
        ("What sport did I take up?", "How do I stay in shape these days?"),
        {"place": ("the old train station", "my office", "the river", "the university")},
        "There's a new gym near {place} but it's expensive.",
    ),
    Fact(
        "Made {dish} from scratch last night and it turned out amazing.",
        ("What did I cook recently?", "Which meal did I prepare at home?"),
        {"dish": ("beef rendang", "mushroom risotto", "pad thai", "shakshuka")},
        "The restaurant downstairs does a decent {dish}.",
    ),
    Fact(
        "Got tickets to see {band} live in {month}!",
        ("Which concert am I going to?", "What show do I have tickets for?"),
        {
            "band": ("Radiohead", "Khruangbin", "Arctic Monkeys", "Fleetwood Mac tribute band"),
            "month": ("June", "December", "April"),
        },
        "My teenager wants to see {band}, no way.",
    ),
    Fact(
        "I'm terrified of {fear}, always have been.",
        ("What is my phobia?", "What scares me the most?"),
        {"fear": ("spiders", "deep water", "heights", "flying", "clowns")},
        "My son used to be scared of {fear} but he's fine now.",
    ),
    Fact(
        "I graduated from {uni} with a degree in {field}.",
        ("Where did I go to college?", "What did I major in?"),
        {
            "uni": ("UCLA", "Trinity College Dublin", "the University of Toronto"),
            "field": ("economics", "civil engineering", "art history", "chemistry"),
        },
        "My mentor did {field} at {uni} decades ago.",
    ),
    Fact(
        "The wifi password at the cabin is {code}, don't lose it.",
        ("What's the wireless key at our holiday house?", "How do I get online at the cabin?"),
        {"code": ("otter-lamp-77", "quokka9fjord", "pinecone#2024", "mossyrock55")},
        "The hotel wifi password was {code}, weirdly.",
    ),
    Fact(
        "Our neighbour {name} waters the plants whenever we travel.",
        (
            "Who takes care of our greenery when we're away?",
            "Who looks after the house plants during trips?",
        ),
        {"name": ("Mrs. Okafor", "Gunther", "Beatriz", "old Mr. Lindqvist")},
        "{name} from the third floor complained about the noise again.",
    ),
    Fact(
        "Someone stole my {color} bike from outside the station yesterday.",
        ("What happened to my bicycle?", "Why don't I have a way to cycle to work?"),
        {"color": ("red", "mint green", "black", "orange")},
        "I saw a {color} bike just like mine at the market.",
    ),
]

#: One question per fact (same order as FACTS) asked the way people usually ask: with some of the
#: statement's own words, as most questions in public conversational-memory sets are.
DIRECT_QUESTIONS = [
    "What did the kids name the puppy from the shelter?",
    "Which job offer did I accept?",
    "What food gives me hives?",
    "Where did I grow up?",
    "What PhD did my younger brother start?",
    "What did I trade the old sedan in for?",
    "What lessons am I taking on Tuesday evenings?",
    "Where did we book flights to for our anniversary?",
    "Which novel did I reread?",
    "What diet did I go on three months ago?",
    "What was my personal best race time?",
    "Where is the flat I signed the lease on?",
    "What does my wife work as?",
    "Which language am I practising every morning?",
    "Where does our daughter start kindergarten?",
    "What did the doctor put me on for my blood pressure?",
    "What did I switch to from coffee?",
    "When is my birthday?",
    "What did I buy for the balcony?",
    "What game have I been playing with my cousin?",
    "Which team have I supported since I was a kid?",
    "What phone did I order as a replacement?",
    "Which gym did I join?",
    "What did I make from scratch last night?",
    "Who did I get tickets to see live?",
    "What am I terrified of?",
    "Where did I graduate from?",
    "What is the wifi password at the cabin?",
    "Which neighbour waters our plants when we travel?",
    "What colour was the bike that got stolen?",
]
assert len(DIRECT_QUESTIONS) == len(FACTS)

USER_CHATTER = [
    "Ugh, Monday again. Can you help me plan my week?",
    "What's a good way to stay focused in the afternoon?",
    "Remind me to call the bank about the card tomorrow.",
    "Can you summarize that article about interest rates I sent earlier?",
    "I'm so tired today, slept badly again.",
    "The weather has been miserable all week.",
    "Can you suggest a quick dinner with what's left in the fridge?",
    "Help me write a polite email declining the meeting.",
    "I need gift ideas for a coworker who is leaving.",
    "What's the difference between a Roth and a traditional IRA?",
    "Traffic was terrible this morning, took an hour.",
    "Can you recommend a podcast for the commute?",
    "Let's continue the budget spreadsheet from yesterday.",
    "My back hurts from sitting all day, any stretches?",
    "How do I get red wine out of a carpet?",
    "Thanks, that was really helpful!",
    "Can you explain how compound interest works again?",
    "I have a dentist appointment on Thursday, ugh.",
    "What should I read next? Something light.",
    "Our internet went down for three hours yesterday.",
    "I want to start journaling, how do I begin?",
    "Can you draft a packing list for a weekend away?",
    "The kids had a school play tonight, it was chaotic but sweet.",
    "Help me compare two laptops for work.",
    "I keep forgetting to drink water during the day.",
    "Do you think I should ask for a raise this year?",
    "Can you make a grocery list for the week?",
    "I watched a documentary about octopuses, fascinating.",
    "What's a good houseplant that's hard to kill?",
    "Let's brainstorm names for my side project.",
]

ASSISTANT_CHATTER = [
    "Of course! Let's break it into a few manageable steps so it feels less overwhelming.",
    "That sounds exhausting. A short walk and some water can help more than you'd expect.",
    "Here's a simple plan: start with the most urgent item, then batch the small tasks.",
    "Good question. In short, it depends on your tax bracket now versus in retirement.",
    "I'd suggest keeping it brief and friendly, and offering an alternative time.",
    "Happy to help! Let me know if you want me to adjust anything.",
    "A few options come to mind; tell me which direction you prefer and I'll expand.",
    "That's a great idea. Consistency matters more than the exact method.",
    "Sure, here's a draft you can tweak to match your tone.",
    "Sorry to hear that. Would it help to set a reminder for later?",
    "Noted! I'll keep that in mind for our future conversations.",
    "Let's compare them on price, battery life, weight and keyboard quality.",
]

ASSISTANT_ACK = [
    "That's wonderful news about {topic}! Tell me more whenever you like.",
    "Thanks for sharing that, I'll remember it. How do you feel about {topic}?",
    "Oh, interesting! {topic} sounds like a big part of your life right now.",
]


@dataclass(frozen=True)
class Turn:
    memory_id: str
    text: str
    created_at_ns: int


@dataclass(frozen=True)
class Question:
    text: str
    evidence: str  # memory id
    kind: str  # "paraphrase" (no shared content word) or "direct"


def build_haystack(seed: int, sessions: int = 24) -> tuple[list[Turn], list[Question]]:
    rng = random.Random(seed)
    turns: list[str] = []
    session_of: list[int] = []
    facts = rng.sample(FACTS, k=len(FACTS))
    placements = sorted(rng.randrange(sessions) for _ in facts)
    evidence_index: list[tuple[int, Fact, dict[str, str]]] = []
    for session in range(sessions):
        for _ in range(rng.randint(8, 16)):
            turns.append("user: " + rng.choice(USER_CHATTER))
            turns.append("assistant: " + rng.choice(ASSISTANT_CHATTER))
            session_of += [session, session]
            if rng.random() < 0.25:
                other = rng.choice(FACTS)
                values = {k: rng.choice(v) for k, v in other.values.items()}
                turns.append("user: " + other.other.format(**values))
                session_of.append(session)
        for fact, placed in zip(facts, placements, strict=True):
            if placed != session:
                continue
            values = {k: rng.choice(v) for k, v in fact.values.items()}
            evidence_index.append((len(turns), fact, values))
            turns.append("user: " + fact.statement.format(**values))
            topic = next(iter(values.values()))
            turns.append("assistant: " + rng.choice(ASSISTANT_ACK).format(topic=topic))
            session_of += [session, session]
    base = 1_700_000_000 * 10**9 + seed * 10**15
    memory_turns = [
        Turn(
            hashlib.sha256(f"{seed}/{i}".encode()).hexdigest(),
            text,
            base + session_of[i] * 86_400 * 10**9 + i * 10**9,
        )
        for i, text in enumerate(turns)
    ]
    questions = []
    for i, fact, values in evidence_index:
        evidence = memory_turns[i].memory_id
        questions.append(Question(rng.choice(fact.questions), evidence, "paraphrase"))
        questions.append(Question(DIRECT_QUESTIONS[FACTS.index(fact)], evidence, "direct"))
        # "What did I say about Biscuit?": a bare name or code, where meaning has little to go on.
        named = [v for v in values.values() if v[:1].isupper() or any(c.isdigit() for c in v)]
        if named:
            questions.append(Question(f"What did I tell you about {named[0]}?", evidence, "entity"))
    return memory_turns, questions


def evaluate(
    embedder: Embedder,
    haystacks: list[tuple[list[Turn], list[Question]]],
    alphas: tuple[float, ...],
) -> dict[str, dict[str, float]]:
    found: dict[float, list[int]] = {a: [] for a in alphas}
    kinds: list[str] = []
    for turns, questions in haystacks:
        index = SearchIndex(embedder.name, embedder.dim)
        vectors = embedder.embed([t.text for t in turns])
        index.add(
            [
                Entry(t.memory_id, t.text, "conversation", t.created_at_ns, vectors[i], None)
                for i, t in enumerate(turns)
            ]
        )
        question_vectors = embedder.embed([q.text for q in questions])
        for q, qv in zip(questions, question_vectors, strict=True):
            kinds.append(q.kind)
            for alpha in alphas:
                hits = index.search(
                    text=q.text,
                    query_vector=qv if alpha > 0 else None,
                    space=BUILTIN,
                    alpha=alpha,
                    limit=10,
                )
                ids = [h.memory_id for h in hits]
                found[alpha].append(ids.index(q.evidence) + 1 if q.evidence in ids else 99)
    out = {}
    kind_of = np.array(kinds)
    for alpha, ranks in found.items():
        ranks_a = np.array(ranks)
        out[f"alpha={alpha:g}"] = {
            "recall@5": round(float((ranks_a <= 5).mean()), 3),
            "recall@10": round(float((ranks_a <= 10).mean()), 3),
            "mrr@10": round(float(np.where(ranks_a <= 10, 1.0 / ranks_a, 0).mean()), 3),
            **{
                f"recall@10_{kind}": round(float((ranks_a[kind_of == kind] <= 10).mean()), 3)
                for kind in ("paraphrase", "direct", "entity")
            },
        }
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| embedder | mode | recall@5 | recall@10 | MRR@10 | recall@10 paraphrased "
        "| recall@10 direct | recall@10 entity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, modes in report["results"].items():
        for mode, r in modes.items():
            label = {"alpha=0": "BM25 alone", "alpha=1": "vector alone"}.get(
                mode, f"hybrid ({mode})"
            )
            lines.append(
                f"| {name} | {label} | {r['recall@5']} | {r['recall@10']} "
                f"| {r['mrr@10']} | {r['recall@10_paraphrase']} "
                f"| {r['recall@10_direct']} | {r['recall@10_entity']} |"
            )
    lines += [
        "",
        f"{report['questions']} questions over {report['haystacks']} users' chats, "
        f"{report['turns']} turns (memories) in all, ~{report['turns_per_user']} per user.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=5)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 1.0])
    parser.add_argument(
        "--out",
        type=Path,
        default=OUT / "search.quality",
        help="written as OUT.json and OUT.md",
    )
    args = parser.parse_args()
    haystacks = [build_haystack(seed) for seed in range(args.users)]
    turns = sum(len(t) for t, _ in haystacks)
    report: dict[str, Any] = {
        "haystacks": args.users,
        "turns": turns,
        "turns_per_user": turns // args.users,
        "questions": sum(len(q) for _, q in haystacks),
        "results": {},
        "seconds": {},
    }
    for embedder in (MiniLMEmbedder(), HashingEmbedder()):
        started = time.perf_counter()
        report["results"][embedder.name] = evaluate(embedder, haystacks, tuple(args.alphas))
        report["seconds"][embedder.name] = round(time.perf_counter() - started, 1)
        print(embedder.name, json.dumps(report["results"][embedder.name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_name(args.out.name + ".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_name(args.out.name + ".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
