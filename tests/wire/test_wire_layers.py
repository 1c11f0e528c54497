"""The wire package's sans-IO core is usable without any I/O library, as h11 is."""

from __future__ import annotations

import subprocess
import sys


def test_importing_wire_loads_neither_trio_nor_trio_websocket() -> None:
    probe = (
        "import sys, wire\n"
        "from wire import SecureChannel, SchemaRegistry, Reassembler, KeyPair, TokenBucket\n"
        "print(sorted(m for m in ('trio', 'trio_websocket') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_trio_adapters_load_on_first_use() -> None:
    import wire

    assert wire.MemoryNetwork.__module__ == "wire._network"
    assert wire.secure_connection.__module__ == "wire._connection"
    assert wire.unwrapped.__module__ == "wire._nursery_errors"
