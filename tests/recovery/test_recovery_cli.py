"""`dmgn export --shares` / `dmgn import --shares` as a user runs them.

One split is made through the real CLI (processes) for the whole module. One choice of three
shares is restored through the real CLI and opens the memories written before the split; the
other nine choices go through the same import command in-process (click's runner) to stay fast.
"""

from __future__ import annotations

import itertools
import json
import os
import pty
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from dmgn.app.cli import main
from dmgn.identity import decrypt_seed
from tests._deadlines import scaled

PASSPHRASE = "correct horse battery"


def dmgn(
    data_dir: Path, *args: str, ok: bool = True, stdin: Any = subprocess.DEVNULL
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DMGN_DATA_DIR": str(data_dir), "DMGN_PASSPHRASE": PASSPHRASE}
    env.pop("DMGN_DEBUG", None)
    done = subprocess.run(
        [sys.executable, "-m", "dmgn.app.cli", *args],
        env=env,
        text=True,
        capture_output=True,
        stdin=stdin,
        timeout=scaled(60),
    )
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def dmgn_json(data_dir: Path, *args: str) -> Any:
    return json.loads(dmgn(data_dir, *args, "--json").stdout)


def in_process(data_dir: Path, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(
        main,
        list(args),
        input=stdin,
        env={"DMGN_DATA_DIR": str(data_dir), "DMGN_PASSPHRASE": PASSPHRASE},
    )


@dataclass
class Split:
    node: Path
    identity: str
    memories: dict[str, str]
    files: list[Path]
    exported: dict[str, Any]
    archive: Path


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Split:
    root = tmp_path_factory.mktemp("split")
    node = root / "node"
    identity = dmgn_json(node, "init")["identity_id"]
    memories = {}
    for text in ("Alice prefers green tea", "The spare key is under the blue pot"):
        memories[dmgn_json(node, "add", text)["id"]] = text
    archive = root / "before-the-split.dmgnbak"
    dmgn_json(node, "backup", "-o", str(archive))
    exported = dmgn_json(node, "export", "--shares", "3-of-5", "-o", str(root / "shares"))
    files = [Path(f["file"]) for f in exported["files"]]
    return Split(node, identity, memories, files, exported, archive)


def test_export_writes_one_private_file_per_share_and_reports_them(split: Split) -> None:
    assert split.exported["identity_id"] == split.identity
    assert split.exported["scheme"] == "any 3 of 5 shares"
    assert [f.name for f in split.files] == [f"dmgn-share-{i}.txt" for i in range(1, 6)]
    assert [f["member_number"] for f in split.exported["files"]] == [1, 2, 3, 4, 5]
    assert "shares" not in split.exported  # with -o the words are in the files only
    for path in split.files:
        assert path.stat().st_mode & 0o777 == 0o600
        words = path.read_text().splitlines()[-1].split()
        assert len(words) == 33
    assert split.files[0].parent.stat().st_mode & 0o777 == 0o700
    # A second export into the same directory overwrites nothing.
    again = dmgn(
        split.node, "export", "--shares", "3-of-5", "-o", str(split.files[0].parent), ok=False
    )
    assert again.returncode == 2 and "exists; choose an empty directory" in again.stderr


def test_three_shares_restore_the_identity_and_open_memories_written_before(
    split: Split, tmp_path: Path
) -> None:
    fresh = tmp_path / "new-laptop"
    chosen = [str(split.files[i]) for i in (0, 2, 4)]
    restored = dmgn_json(fresh, "import", "--shares", *chosen)
    assert restored["identity_id"] == split.identity
    assert restored["shares_used"] == 3
    # The memories come back from a `dmgn backup` archive made before the split: its key
    # derives from the identity seed, so only the restored identity can open it.
    dmgn_json(fresh, "restore", "-i", str(split.archive))
    recent = dmgn_json(fresh, "query", "--recent", "--full")
    opened = {hit["memory_id"]: hit["content"] for hit in recent["results"]}
    assert opened == split.memories

    # Control: another identity cannot open that archive.
    stranger = tmp_path / "stranger"
    dmgn(stranger, "init")
    refused = dmgn(stranger, "restore", "-i", str(split.archive), ok=False)
    assert refused.returncode != 0, refused.stdout
    assert "not of this node's identity" in refused.stderr
    assert dmgn_json(stranger, "query", "--recent")["results"] == []


def test_every_choice_of_three_restores_the_same_seed(split: Split, tmp_path: Path) -> None:
    original = decrypt_seed(
        (split.node / "identity.vault").read_bytes(), PASSPHRASE, source=split.node
    )
    choices = list(itertools.combinations(range(5), 3))
    assert len(choices) == 10
    for choice in choices:
        fresh = tmp_path / "-".join(map(str, choice))
        result = in_process(
            fresh, "import", "--shares", *(str(split.files[i]) for i in choice), "--json"
        )
        assert result.exit_code == 0, result.output
        # The identity id is the ed25519 public key of the seed: equal ids, equal seeds.
        assert json.loads(result.stdout)["identity_id"] == split.identity
    vault = tmp_path / "-".join(map(str, choices[-1])) / "identity.vault"
    assert decrypt_seed(vault.read_bytes(), PASSPHRASE, source=vault) == original


def test_two_shares_are_refused_with_how_many_are_missing(split: Split, tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    done = dmgn(fresh, "import", "--shares", str(split.files[1]), str(split.files[3]), ok=False)
    assert done.returncode == 2
    assert "2 shares given, 1 more share needed; nothing was changed" in done.stderr
    assert not (fresh / "identity.vault").exists()
    as_json = dmgn(fresh, "import", "--shares", str(split.files[1]), "--json", ok=False)
    assert json.loads(as_json.stderr) == {
        "error": "1 share given, 2 more shares needed; nothing was changed",
        "code": "not_enough_shares",
    }


def test_a_changed_word_is_named_with_its_file_and_position(split: Split, tmp_path: Path) -> None:
    lines = split.files[2].read_text().splitlines()
    words = lines[-1].split()
    words[6] = "zero" if words[6] != "zero" else "yoga"
    typo = tmp_path / "typo.txt"
    typo.write_text("\n".join([*lines[:-1], " ".join(words)]) + "\n")
    done = dmgn(
        tmp_path / "fresh",
        "import",
        "--shares",
        str(split.files[0]),
        str(typo),
        str(split.files[4]),
        ok=False,
    )
    assert done.returncode == 2
    assert f"{typo}: word 7 ('{words[6]}') of this share is wrong" in done.stderr


def test_shares_of_two_splits_are_refused(split: Split, tmp_path: Path) -> None:
    other = in_process(
        split.node, "export", "--shares", "3-of-5", "-o", str(tmp_path / "other"), "--json"
    )
    foreign = json.loads(other.stdout)["files"][2]["file"]
    done = dmgn(
        tmp_path / "fresh",
        "import",
        "--shares",
        str(split.files[0]),
        str(split.files[1]),
        foreign,
        ok=False,
    )
    assert done.returncode == 2
    assert f"{foreign}: this share is from a different split" in done.stderr
    assert not (tmp_path / "fresh" / "identity.vault").exists()


def share_lines(split: Split, *which: int) -> str:
    return "".join(split.files[i].read_text().splitlines()[-1] + "\n" for i in which)


def test_shares_piped_on_stdin_one_per_line(split: Split, tmp_path: Path) -> None:
    result = in_process(
        tmp_path / "a", "import", "--shares", "--json", stdin=share_lines(split, 4, 1, 3)
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["identity_id"] == split.identity
    # A bad line with nobody to retype it fails, naming the line.
    bad = share_lines(split, 4) + "acid acne zero\n" + share_lines(split, 1, 3)
    failed = in_process(tmp_path / "b", "import", "--shares", stdin=bad)
    assert failed.exit_code == 2
    assert "share on line 2: the share has 3 words" in failed.output


def test_typed_shares_are_checked_one_at_a_time_on_a_terminal(split: Split, tmp_path: Path) -> None:
    good = share_lines(split, 0, 3, 2).splitlines()
    words = good[1].split()
    words[11] = "zero" if words[11] != "zero" else "yoga"
    typed = [good[0], " ".join(words), good[1], good[2]]
    controller, terminal = pty.openpty()
    try:
        env = {
            **os.environ,
            "DMGN_DATA_DIR": str(tmp_path / "typed"),
            "DMGN_PASSPHRASE": PASSPHRASE,
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "dmgn.app.cli", "import", "--shares", "--json"],
            stdin=terminal,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        os.write(controller, "".join(line + "\n" for line in typed).encode())
        out, err = process.communicate(timeout=60)
    finally:
        os.close(controller)
        os.close(terminal)
    assert process.returncode == 0, err
    assert json.loads(out)["identity_id"] == split.identity
    assert "ok, share 1 accepted: 2 more shares needed" in err
    assert "x word 12 (" in err  # the typo is named, and the share typed again
    assert "ok, share 2 accepted: 1 more share needed" in err
    assert "ok, share 3 accepted: enough shares" in err
    assert good[0] not in err and good[1] not in err


def test_printing_shares_to_a_non_terminal_needs_force(split: Split) -> None:
    refused = dmgn(split.node, "export", "--shares", "2-of-3", ok=False)
    assert refused.returncode == 2 and "refusing to print identity shares" in refused.stderr
    assert refused.stdout == ""
    forced = in_process(split.node, "export", "--shares", "2-of-3", "--force", "--json")
    assert forced.exit_code == 0, forced.output
    listed = json.loads(forced.stdout)
    assert listed["identity_id"] == split.identity
    assert [len(s["mnemonic"].split()) for s in listed["shares"]] == [33, 33, 33]
    human = in_process(split.node, "export", "--shares", "2-of-3", "--force").stdout
    assert "-- share 1 of 3 --" in human and " 33 " in human


def test_groups_through_the_cli(split: Split, tmp_path: Path) -> None:
    out = tmp_path / "family"
    exported = in_process(
        split.node, "export", "--shares", "2-of-3 family, 1 of lawyer", "-o", str(out), "--json"
    )
    assert exported.exit_code == 0, exported.output
    names = [Path(f["file"]).name for f in json.loads(exported.stdout)["files"]]
    assert names == [
        "dmgn-share-family-1.txt",
        "dmgn-share-family-2.txt",
        "dmgn-share-family-3.txt",
        "dmgn-share-lawyer-1.txt",
    ]
    family_only = in_process(
        tmp_path / "a", "import", "--shares", str(out / names[0]), str(out / names[2])
    )
    assert family_only.exit_code == 2
    assert "at least 1 more share needed (1 of 2 groups complete)" in family_only.output
    restored = in_process(
        tmp_path / "b",
        "import",
        "--shares",
        str(out / names[1]),
        str(out / names[3]),
        str(out / names[2]),
        "--json",
    )
    assert restored.exit_code == 0, restored.output
    assert json.loads(restored.stdout)["identity_id"] == split.identity


def test_share_passphrase_is_needed_to_get_the_identity_back(split: Split, tmp_path: Path) -> None:
    secret = tmp_path / "share-passphrase"
    secret.write_text("tea at five o'clock\n")
    out = tmp_path / "locked"
    exported = in_process(
        split.node,
        "export",
        "--shares",
        "2-of-3",
        "-o",
        str(out),
        "--share-passphrase-file",
        str(secret),
        "--json",
    )
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["share_passphrase"] is True
    files = [str(out / f"dmgn-share-{i}.txt") for i in (1, 3)]
    right = in_process(
        tmp_path / "a",
        "import",
        "--shares",
        *files,
        "--share-passphrase-file",
        str(secret),
        "--json",
    )
    assert json.loads(right.stdout)["identity_id"] == split.identity
    # SLIP-39 by design: a wrong (or missing) passphrase opens another identity, silently.
    wrong = in_process(tmp_path / "b", "import", "--shares", *files, "--json")
    assert json.loads(wrong.stdout)["identity_id"] != split.identity


def test_import_says_what_to_import_from(split: Split, tmp_path: Path) -> None:
    neither = dmgn(tmp_path / "x", "import", ok=False)
    assert neither.returncode == 2 and "-i FILE (a backup) or --shares" in neither.stderr
    loose = dmgn(tmp_path / "x", "import", "-i", "a", str(split.files[0]), ok=False)
    assert loose.returncode == 2 and "read with --shares" in loose.stderr
    no_output = dmgn(split.node, "export", ok=False)
    assert no_output.returncode == 2 and "-o FILE" in no_output.stderr
    # The identity in place is protected before any share is asked for.
    busy = dmgn(split.node, "import", "--shares", str(split.files[0]), ok=False)
    assert busy.returncode == 6 and "already exists" in busy.stderr


def test_a_file_far_larger_than_shares_is_refused_without_reading_it(tmp_path: Path) -> None:
    huge = tmp_path / "disk.img"
    with huge.open("wb") as file:  # sparse: 100 MB that cost no disk
        file.truncate(100 * 1024 * 1024)
    result = in_process(tmp_path / "fresh", "import", "--shares", str(huge))
    assert result.exit_code == 2
    assert f"{huge} is larger than 256 KiB, far more than a share file" in result.output
    assert not (tmp_path / "fresh" / "identity.vault").exists()


def test_a_long_token_given_as_a_share_is_not_echoed(tmp_path: Path) -> None:
    # A 20 MB token in the error went to the terminal (and any log of it) whole.
    token = "q" * 100_000
    pasted = tmp_path / "token.txt"
    pasted.write_text(token + "\n")
    from_file = in_process(tmp_path / "a", "import", "--shares", str(pasted))
    assert from_file.exit_code == 2
    assert "... (100000 characters)' is not a SLIP-39 share word" in from_file.output
    assert len(from_file.output) < 500, from_file.output[:500]
    piped = in_process(tmp_path / "b", "import", "--shares", stdin=token + "\n")
    assert piped.exit_code == 2
    assert "line 1 is longer than 4096 characters" in piped.output
    assert len(piped.output) < 500, piped.output[:500]
