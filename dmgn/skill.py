"""The text behind the ``load_skill`` MCP tool: how an agent should use dmgn's memory tools.

It is written for a language model, not for a person reading docs: short imperative sections,
when to call which tool, and the mistakes that waste context. Keep it under ~1,000 tokens; an
agent loads it into its context window, so every line must earn its place.
"""

from __future__ import annotations

SKILL_NAME = "dmgn-memory"
SKILL_VERSION = "1"

SKILL_TEXT = """\
# Skill: long-term memory with dmgn

You have a private, encrypted, lifetime memory that belongs to the user and follows them across
devices and AI tools. What you store now, a later conversation (maybe in another tool) can find.

## At the start of a conversation
1. Call `get_context` (limit 10-20) to see the most recent memories, oldest first.
2. If the user's first message is about a known topic, call `query_memory` with a few precise
   keywords from it. Read snippets; fetch full text with `include_content: true` only when needed.

## What to remember (call `add_memory`)
- Durable facts and preferences: names, roles, tools, decisions, constraints, goals.
- Outcomes: what was decided, what was tried and failed, what worked, open questions.
- Write one self-contained fact or summary per memory, in plain sentences a stranger could
  understand months later. Include names and dates; avoid "this", "above", "the user said".
- Pick a `type`: `observation` (a fact/preference), `conversation` (a dialogue summary),
  `document` (a chunk of a file or page), `text` (anything else).
- Put filterable facts in `metadata` (string values): `{"project": "atlas", "source": "chat"}`.
- Link a new memory to the memories it refines or answers via `links` (ids from earlier results).

## What not to store
- Secrets (passwords, API keys, tokens), unless the user explicitly asks.
- Chit-chat, whole transcripts, or things you can recompute. Do not store duplicates: search
  first, and if a memory is outdated, add the corrected one, link it (`edge_type: "supersedes"`),
  and delete the old one only if the user agrees.

## Searching well (`query_memory`)
- Use specific words that would appear in the memory; try 2-3 phrasings if the first finds nothing.
- Narrow with `filter_type`, and with `filter_after` / `filter_before` (ISO-8601 like
  `2025-03-01` or `2025-03-01T12:00:00Z`, or nanoseconds since the epoch).
- Scores are relative within one answer; an empty result means "not remembered", not an error.

## Relations
- `link_memories` connects two memories (`edge_type` such as `related`, `supersedes`, `causes`,
  `part_of`); `get_graph` walks the links from one memory up to `max_depth` hops.
- For an explicit knowledge graph: `add_node` for each entity (person, project, concept) with a
  `node_type`, `add_edge` with a verb-like `relation` (`works_on`, `depends_on`), and
  `query_graph` with a `node_id` or a text `query` to explore the neighbourhood.
  Before adding a node, `query_graph` or `query_memory` for its name to avoid duplicates.

## Ids and errors
- Every id is a 64-character hex string; a unique prefix of at least 6 characters also works.
- A tool error says what was wrong with the arguments: fix them and call again, do not loop.
- `delete_memory` is permanent and syncs to all the user's devices: only on explicit request.
- `get_status` reports the node (memories count, peers) if the user asks about their memory.

## Tell the user
Mention briefly when you store or use a memory ("I'll remember that you prefer tabs"), so they
stay in control of what their memory holds.
"""
