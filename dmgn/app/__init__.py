"""Entry points and process code: the top layer, which may import anything below it.

The `dmgn` CLI and its rendering, the `dmgn-node` main, daemon spawning and the data dir lock,
the control client, the MCP stdio relay and the passphrase prompt.
"""
