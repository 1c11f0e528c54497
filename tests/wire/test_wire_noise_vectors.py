"""Every cacophony vector for our suites must be reproduced byte for byte.

``vectors/noise-cacophony-25519-chachapoly.json`` is a copy of the project's shared vector file
(its ``source`` field names the upstream: haskell-cryptography/cacophony vectors/cacophony.txt,
with the handshake hashes as fixed upstream in 8f6c53a). ``noise-cacophony-25519-aesgcm.json``
holds the same patterns and hashes with the AESGCM cipher, taken from that upstream file at
8ee9d41 (issue 17: the secure channel may choose AESGCM). Tests read only these copies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from wire._noise import HandshakeState, KeyPair, NoiseProtocol

VECTORS_PATH = Path(__file__).parent / "vectors" / "noise-cacophony-25519-chachapoly.json"
AESGCM_VECTORS_PATH = Path(__file__).parent / "vectors" / "noise-cacophony-25519-aesgcm.json"
VECTORS: list[dict[str, Any]] = [
    *json.loads(VECTORS_PATH.read_text())["vectors"],
    *json.loads(AESGCM_VECTORS_PATH.read_text())["vectors"],
]


def _key(vector: dict[str, Any], name: str) -> KeyPair | None:
    value = vector.get(name)
    return KeyPair.from_private(bytes.fromhex(value)) if value else None


def _bytes(vector: dict[str, Any], name: str) -> bytes | None:
    value = vector.get(name)
    return bytes.fromhex(value) if value is not None else None


def test_vector_file_covers_every_suite_we_claim() -> None:
    names = {v["protocol_name"] for v in VECTORS}
    assert "Noise_XX_25519_ChaChaPoly_BLAKE2b" in names
    for cipher in ("ChaChaPoly", "AESGCM"):
        for pattern in ("NN", "IK", "XX", "XXpsk3"):
            for hash_name in ("BLAKE2b", "BLAKE2s", "SHA256", "SHA512"):
                assert f"Noise_{pattern}_25519_{cipher}_{hash_name}" in names


@pytest.mark.parametrize("vector", VECTORS, ids=[v["protocol_name"] for v in VECTORS])
def test_cacophony_vector(vector: dict[str, Any]) -> None:
    protocol = NoiseProtocol.from_name(vector["protocol_name"])
    initiator = HandshakeState(
        protocol,
        initiator=True,
        prologue=bytes.fromhex(vector["init_prologue"]),
        s=_key(vector, "init_static"),
        e=_key(vector, "init_ephemeral"),
        rs=_bytes(vector, "init_remote_static"),
        psk=_bytes(vector, "init_psk"),
    )
    responder = HandshakeState(
        protocol,
        initiator=False,
        prologue=bytes.fromhex(vector["resp_prologue"]),
        s=_key(vector, "resp_static"),
        e=_key(vector, "resp_ephemeral"),
        rs=_bytes(vector, "resp_remote_static"),
        psk=_bytes(vector, "resp_psk"),
    )
    for index, message in enumerate(vector["messages"]):
        payload = bytes.fromhex(message["payload"])
        expected = bytes.fromhex(message["ciphertext"])
        # Cacophony alternates senders for every message, handshake and transport alike.
        sender, receiver = (initiator, responder) if index % 2 == 0 else (responder, initiator)
        if not initiator.complete:
            assert sender.write_message(payload) == expected
            assert receiver.read_message(expected) == payload
            if initiator.complete:
                assert responder.complete
                assert initiator.handshake_hash.hex() == vector["handshake_hash"]
                assert responder.handshake_hash == initiator.handshake_hash
        else:
            assert sender.send_cipher.encrypt_with_ad(b"", payload) == expected
            assert receiver.receive_cipher.decrypt_with_ad(b"", expected) == payload
    assert initiator.complete and responder.complete
    assert len(vector["messages"]) > len(protocol.messages)  # transport messages were checked too


def test_vector_copy_names_its_upstream_source() -> None:
    for path in (VECTORS_PATH, AESGCM_VECTORS_PATH):
        source = json.loads(path.read_text())["source"]
        assert "cacophony" in source and "8f6c53a" in source
