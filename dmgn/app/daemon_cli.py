"""The `dmgn` commands a running daemon answers, before click, pydantic or rich are imported.

`dmgn status` through the daemon is one small request on a Unix socket; what a person waited
for was Python importing click, pydantic (dmgn.api, dmgn.config) and rich (issue 17). So the
console script (and ``python -m dmgn.app.cli``) first asks :func:`answer_through_daemon`:

* It understands only a plain command line of ``status``, ``peers``, ``get ID`` or ``query``
  with their usual options. Anything else - another command, ``--help``, an unknown or
  malformed option, a value click would refuse - returns ``None`` and the full click CLI runs,
  with every message and exit code it has.
* It sends the request as its plain wire dict (what ``api.X(...).to_wire()`` gives; a test
  keeps the two equal). The daemon validates it with :mod:`dmgn.api`, so a bad value comes back
  as the same one-line error and exit code the in-process check gives.
* If nothing listens on the data dir's control socket, it returns ``None`` without having sent
  anything: the full CLI then waits for a daemon that is starting, or works offline.
* Output is what the full CLI prints: ``--json`` as JSON, ``status`` through the rich-free
  :mod:`dmgn.app.render_plain`, the other commands through :mod:`dmgn.app.render` (rich,
  imported only then).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

from dmgn.errors import DmgnError, InvalidInput

__all__ = ["answer_through_daemon", "argument_text", "main", "parse_time", "wire_request"]

#: The commands answered here, and the options each takes besides --data-dir, --json and
#: --passphrase-file: option -> (takes a value, repeatable). Mirrors dmgn.app.cli.
MEMORY_TYPES = ("text", "conversation", "observation", "document")
_COMMON: dict[str, tuple[bool, bool]] = {
    "--data-dir": (True, False),
    "--json": (False, False),
    "--passphrase-file": (True, False),
}
_COMMANDS: dict[str, tuple[dict[str, tuple[bool, bool]], int, int]] = {
    # command: (options, fewest positional arguments, most)
    "status": ({}, 0, 0),
    "peers": ({}, 0, 0),
    "get": ({}, 1, 1),
    "query": (
        {
            "--recent": (False, False),
            "--limit": (True, False),
            "--type": (True, True),
            "--after": (True, False),
            "--before": (True, False),
            "--links-of": (True, False),
            "--alpha": (True, False),
            "--full": (False, False),
        },
        0,
        1,
    ),
}


@dataclass
class CommandLine:
    """A command line this module can answer: the command, its arguments and options."""

    command: str
    arguments: list[str]
    values: dict[str, str] = field(default_factory=dict)
    repeated: dict[str, list[str]] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)


def parse(argv: list[str]) -> CommandLine | None:
    """``argv`` (without the program name) if it is a plain command line of ours, else None."""
    if not argv or argv[0] not in _COMMANDS:
        return None
    command = argv[0]
    options, fewest, most = _COMMANDS[command]
    known = {**_COMMON, **options}
    line = CommandLine(command, [])
    tokens = iter(argv[1:])
    for token in tokens:
        if not _plain_text(token):
            return None
        if not token.startswith("-") or token == "-":
            line.arguments.append(token)
            continue
        name, equals, explicit = token.partition("=")
        if name not in known:
            return None  # --help, an unknown option, "--": click says what it says
        takes_value, repeatable = known[name]
        if not takes_value:
            if equals:
                return None
            line.flags.add(name)
            continue
        value = explicit if equals else next(tokens, None)
        if value is None or value == "" or value.startswith("-") or not _plain_text(value):
            return None
        if repeatable:
            line.repeated.setdefault(name, []).append(value)
        else:
            line.values[name] = value
    if not fewest <= len(line.arguments) <= most:
        return None
    return line


def _plain_text(value: str) -> bool:
    """Text that is UTF-8 (an argument that is not reaches Python as lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_time(text: str | None) -> int | None:
    """ISO-8601 date/time (local time if no zone) or integer nanoseconds → ns."""
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    import datetime as dt

    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"{text!r} is not a time like 2026-01-31 or 2026-01-31T14:00") from None
    return int(moment.timestamp() * 1e9)


def argument_text(value: str, what: str) -> str:
    """A command-line argument as text. Bytes that are not UTF-8 reach Python as lone
    surrogates (surrogateescape); say so here rather than fail later with a codec error."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidInput(
            f"{what} is not UTF-8 (byte 0x{ord(value[error.start]) & 0xFF:02x} at character "
            f"{error.start}); pass UTF-8 text, or put the text in a file and use `dmgn add - "
            "--encoding ENCODING < FILE`"
        ) from None
    return value


class _NotOurs(Exception):
    """A value click converts differently or refuses: let click handle the command line."""


def wire_request(line: CommandLine) -> dict[str, Any]:
    """The request in its wire form, as ``api.X(...).to_wire()`` of dmgn.app.cli gives it.

    Raises :class:`~dmgn.errors.InvalidInput` where the full CLI does before validation (text
    that is not UTF-8, a time it cannot read) and :class:`_NotOurs` where click would refuse a
    value (a --limit that is no integer, an unknown --type).
    """
    if line.command in ("status", "peers"):
        return {"op": line.command}
    if line.command == "get":
        return {"op": "get", "id": line.arguments[0]}
    values = line.values
    try:
        limit = int(values.get("--limit", "10"))
        alpha = float(values["--alpha"]) if "--alpha" in values else None
    except ValueError:
        raise _NotOurs from None
    types = line.repeated.get("--type", [])
    if any(kind not in MEMORY_TYPES for kind in types):
        raise _NotOurs
    text = argument_text(line.arguments[0], "TEXT") if line.arguments else None
    return {
        "op": "query",
        "text": text,
        "embedding": None,
        "limit": limit,
        "types": types,
        "after": parse_time(values.get("--after")),
        "before": parse_time(values.get("--before")),
        "links_of": values.get("--links-of"),
        "alpha": alpha,
        "include_content": "--full" in line.flags,
        "recent": "--recent" in line.flags,
    }


def answer_through_daemon(argv: list[str]) -> int | None:
    """Answer ``argv`` through the running daemon: the exit code, or None when the full CLI
    must handle it (not a command line of ours, or no daemon listening; nothing was sent)."""
    line = parse(argv)
    if line is None:
        return None
    as_json = "--json" in line.flags
    try:
        return _answer(line, as_json)
    except DmgnError as error:
        return _fail(as_json, str(error), error.code, error.exit_code)
    except KeyboardInterrupt:
        return _fail(as_json, "interrupted", "interrupted", 130)
    except Exception as error:  # a bug: one line for people, the trace on request (as cli.py)
        if os.environ.get("DMGN_DEBUG"):
            raise
        return _fail(
            as_json,
            f"internal error: {type(error).__name__}: {error} (set DMGN_DEBUG=1 "
            "for a traceback, and please report it)",
            "internal",
            70,
        )


def _answer(line: CommandLine, as_json: bool) -> int | None:
    from pathlib import Path

    from dmgn.app.control_client import NotListening, call
    from dmgn.paths import ENV_DATA_DIR, DataDir, default_data_dir

    os.umask(0o077)  # as the `dmgn` group does for every command
    given = line.values.get("--data-dir") or os.environ.get(ENV_DATA_DIR) or None
    data_dir = DataDir((Path(given) if given else default_data_dir()).expanduser().absolute())
    if line.command == "status" and not data_dir.vault.exists():
        return None  # the full CLI says there is no identity
    try:
        body = wire_request(line)
    except _NotOurs:
        return None
    try:
        response = call(data_dir, body)
    except NotListening:
        return None
    if as_json:
        import json

        sys.stdout.write(json.dumps(response, indent=2, ensure_ascii=False) + "\n")
    elif line.command == "status":
        from dmgn.app.render_plain import render_status

        render_status(response)
    else:
        from rich.console import Console

        from dmgn.app.render import render

        render(Console(), line.command, response)
    return 0


def _fail(as_json: bool, message: str, code: str, exit_code: int) -> int:
    if as_json:
        import json

        sys.stderr.write(json.dumps({"error": message, "code": code}) + "\n")
    else:
        sys.stderr.write(f"dmgn: {message}\n")
    return exit_code


def main() -> None:
    """The `dmgn` console script: a command the daemon answers here, the rest through click."""
    code = answer_through_daemon(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from dmgn.app.cli import main as click_main

    click_main()
