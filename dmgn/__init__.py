"""dmgn: a decentralized, end-to-end encrypted, lifetime memory layer for AI agents."""

__version__ = "0.1.0"
