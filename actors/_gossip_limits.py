"""Gossip's limits: every bound a peer's traffic meets, with the reason for its number."""

from __future__ import annotations

#: Entries per ``gossip.ops`` message and bytes per message (one entry may exceed the byte cap
#: alone: a 1 MiB document memory still travels). 2 MiB keeps one message well under wire's
#: 16 MiB reassembly cap and a slow link busy for well under a second per message on a LAN.
MAX_BATCH_ENTRIES = 512
MAX_BATCH_BYTES = 2 * 1024 * 1024
#: Entries one want may ask for. The requester asks for the next range when one completes, so
#: this bounds what is in flight per feed (~4 MiB of small memories) without stalling much.
MAX_WANT_ENTRIES = 4096
#: Wants a peer may have queued with us. An honest peer has at most one per feed it lacks.
MAX_PENDING_WANTS = 64
#: Outgoing messages queued per peer beyond which live pushes are dropped (the peer then learns
#: what it missed from the next vector). Backpressure from one slow peer must not stall the actor.
OUTBOX_MESSAGES = 256
#: Per-peer rate limits (token buckets: sustained per second, burst). Generous for an honest
#: device pushing a bulk import entry by entry; a flooder hits them within a second or two.
MESSAGE_RATE, MESSAGE_BURST = 500.0, 2000.0
WASTE_RATE, WASTE_BURST = 200.0, 2000.0
#: Score lost per cut-off, and the score at which a peer's reconnections are refused.
CUT_OFF_PENALTY = 10
REFUSE_SCORE = -30
#: Local publishes signed and synced to disk together at most (group commit).
PUBLISH_GROUP_MAX = 256
#: Above this many entries a batch is verified in a worker thread (signatures cost ~0.1 ms each).
THREAD_VERIFY_THRESHOLD = 32
#: Deadline for the service to apply one batch of ops (a DuckDB transaction with a sync).
APPLY_TIMEOUT = 60.0
DEFAULT_SYNC_INTERVAL = 60.0
#: A want not fully answered within this time is asked again (of any peer that has the range);
#: also the retry delay after the service failed to apply a batch.
WANT_TIMEOUT = 30.0
