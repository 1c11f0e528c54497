"""Simulations: many dmgn nodes in one process over an in-memory network.

The same actors as production, wired to `wire.MemoryNetwork` (real Noise handshakes over memory
streams) instead of WebSockets, so scenarios are fast, deterministic given a seed, and need no
ports. Run a scenario with ``python -m sims``.
"""
