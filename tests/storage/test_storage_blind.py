"""A storage node's files hold nothing readable: no memory text, no metadata value, no memory id
(so no link between ids), no device id of the owner."""

from __future__ import annotations

from pathlib import Path

from nacl.signing import SigningKey

from actors import store as st
from actors.runtime import call, expect
from dmgn import api
from dmgn.identity import derived_key
from tests.storage._cluster import cluster, eventually, seed_of


def _storage_files(root: Path) -> tuple[int, bytes]:
    files = [p for p in root.rglob("storage.duckdb*") if p.is_file()]
    return len(files), b"".join(p.read_bytes() for p in files)


async def test_storage_files_contain_no_text_metadata_ids_or_links(tmp_path: Path) -> None:
    async with cluster() as nodes:
        storage = [
            await nodes.start(f"s{i}", f"stranger{i % 2}", data_dir=tmp_path / f"s{i}")
            for i in range(6)
        ]
        owner = await nodes.start("owner", "owner")
        secret_texts = [f"the vault code is zebra-{i}-quartz" for i in range(8)]
        ids = []
        for i, text in enumerate(secret_texts):
            response = await owner.node.request(
                api.AddMemory(content=text, metadata={"project": f"nightingale-{i}"})
            )
            ids.append(str(response["id"]))
        await owner.node.request(api.LinkMemories(from_id=ids[1], to_id=ids[0]))
        await owner.node.request(api.DeleteMemory(id=ids[7]))

        async def spread() -> bool:
            held = [await m.storage() for m in storage]
            return (
                sum(h.objects for h in held) >= 6 * 7 and sum(h.mail_items for h in held) >= 4 * 10
            )

        await eventually(spread)
        device = owner.node.device_id
        for member in storage:
            await member.stop()
        count, blob = _storage_files(tmp_path)
        assert count >= 6
        # The files do hold the owner's objects under its storage-owner key (the clear owner
        # column), never under its identity key (issue 20).
        owner_key = SigningKey(derived_key(seed_of("owner"), "storage-owner")).verify_key
        assert bytes(owner_key) in blob
        assert bytes(SigningKey(seed_of("owner")).verify_key) not in blob
        for text in secret_texts:
            assert text.encode() not in blob and b"zebra" not in blob
        assert b"nightingale" not in blob and b"project" not in blob
        for mid in ids:
            assert mid.encode() not in blob and bytes.fromhex(mid) not in blob
        assert device not in blob and device.hex().encode() not in blob
        inventory = await expect(await call(owner.node.store, st.Inventory))
        assert len(inventory.links) == 1  # the link exists, only nowhere on storage nodes
