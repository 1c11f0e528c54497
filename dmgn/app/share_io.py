"""The terminal and file side of SLIP-39 shares (:mod:`dmgn.recovery` is the logic).

Shares go where the user sends them and nowhere else: printed once to a terminal, or written to
one 0600 file per holder with ``-o DIR``. They are never logged, never passed in argv or the
environment (they are typed, piped on stdin, or read from the files named on the command line),
and never copied into a temporary or cache file.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import click

from dmgn.errors import InvalidInput
from dmgn.paths import write_private
from dmgn.recovery import (
    Recovery,
    Scheme,
    Share,
    ShareRejected,
    mnemonics_in_file,
    share_file_text,
)

#: Words per printed row: six SLIP-39 words (at most 8 letters) and their numbers fit 80 columns.
WORDS_PER_ROW = 6
#: Largest share file read. A share is at most 59 words of at most 8 letters (~550 bytes; dmgn's
#: are 33 words): even every share SLIP-39 allows (16 groups of 16) with the comment lines
#: export writes is under 256 KiB. Beyond that it is not a share file, and reading it whole
#: cost 1.25 GB of memory for a 100 MB file (issue 30).
MAX_SHARE_FILE_BYTES = 256 * 1024
#: Longest share line read from stdin: 59 words with their numbers and spaces fit in 1,000
#: characters; 4 KiB leaves room for any layout.
MAX_SHARE_LINE_CHARS = 4096


def numbered_words(share: Share) -> str:
    cells = [f"{i:>2} {word:<9}" for i, word in enumerate(share.words, 1)]
    rows = [cells[i : i + WORDS_PER_ROW] for i in range(0, len(cells), WORDS_PER_ROW)]
    return "\n".join("  " + " ".join(row).rstrip() for row in rows)


def print_shares(identity: str, scheme: Scheme, shares: list[Share]) -> None:
    """Show each share once, numbered word by word so a typo can be found by position."""
    click.echo(
        f"Identity {identity}\n{len(shares)} shares; {scheme.describe()} restore it. Give each "
        "share to one person (write it on paper); fewer than needed reveal nothing.\n"
    )
    for share in shares:
        click.echo(f"-- {share.label} --")
        click.echo(numbered_words(share))
        click.echo()
    click.echo(
        "These shares are stored nowhere. Once written down, clear this terminal and its "
        "scrollback. Restore with `dmgn import --shares`."
    )


def write_share_files(directory: Path, scheme: Scheme, shares: list[Share]) -> list[Path]:
    """One 0600 file per share in ``directory`` (created 0700); refuses to overwrite any."""
    targets = [directory / share.file_name for share in shares]
    existing = [str(t) for t in targets if t.exists()]
    if existing:
        raise InvalidInput(
            f"{existing[0]} exists; choose an empty directory for the shares (nothing written)"
        )
    if directory.exists() and not directory.is_dir():
        raise InvalidInput(f"{directory} is not a directory; -o takes a directory with --shares")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for target, share in zip(targets, shares, strict=True):
        write_private(target, share_file_text(share, scheme).encode())
    return targets


def recover_from_files(paths: tuple[Path, ...]) -> tuple[Recovery, int]:
    recovery = Recovery()
    count = 0
    for path in paths:
        try:
            with path.open("rb") as file:
                data = file.read(MAX_SHARE_FILE_BYTES + 1)
            if len(data) > MAX_SHARE_FILE_BYTES:
                raise InvalidInput(
                    f"{path} is larger than {MAX_SHARE_FILE_BYTES // 1024} KiB, far more than a "
                    "share file (a few hundred bytes a share); is it the right file?"
                )
            text = data.decode()
        except OSError as error:
            raise InvalidInput(f"cannot read share file {path}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise InvalidInput(f"{path} is not a share file (not text)") from None
        mnemonics = mnemonics_in_file(text)
        if not mnemonics:
            raise InvalidInput(f"{path} holds no share (every line is blank or a # comment)")
        for mnemonic in mnemonics:
            try:
                recovery.add(mnemonic)
            except ShareRejected as error:
                raise ShareRejected(f"{path}: {error}; nothing was changed") from None
            count += 1
    return recovery, count


def recover_from_stdin(stream: TextIO | None = None) -> tuple[Recovery, int]:
    """Shares one per line: prompted for on a terminal (a bad one is retyped), else piped."""
    stream = stream or sys.stdin
    interactive = stream.isatty()
    recovery = Recovery()
    entered = 0
    line_number = 0
    if interactive:
        click.echo(
            "Type (or paste) each share, then Enter. Word numbers may be included.", err=True
        )
    while True:
        if interactive:
            click.echo(f"Share {entered + 1}: ", nl=False, err=True)
        line = stream.readline(MAX_SHARE_LINE_CHARS + 1)
        line_number += 1
        if len(line) > MAX_SHARE_LINE_CHARS:  # not a share: refuse it without reading on
            raise ShareRejected(
                f"line {line_number} is longer than {MAX_SHARE_LINE_CHARS} characters; a share "
                "is 20-59 words separated by spaces - is this the right input?"
            )
        if not line:
            if interactive:
                click.echo(err=True)
            return recovery, entered
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            progress = recovery.add(line)
        except ShareRejected as error:
            if not interactive:
                raise ShareRejected(f"share on line {line_number}: {error}") from None
            click.echo(f"  x {error}", err=True)
            continue
        entered += 1
        click.echo(f"  ok, share {entered} accepted: {progress.describe()}", err=True)
        if progress.complete:
            return recovery, entered
