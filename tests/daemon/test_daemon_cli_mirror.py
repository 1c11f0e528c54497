"""The fast path (dmgn.app.daemon_cli) keeps its own table of the options of status, peers, get
and query so it can answer without importing click. That table must say what the click CLI
says: every option it accepts exists on the click command with the same kind (flag, value,
repeatable), and the positional arguments agree. A renamed or retyped click option fails here
instead of being accepted by the fast path with its old meaning."""

from __future__ import annotations

import click
import pytest

from dmgn.app import cli, daemon_cli


def click_command(name: str) -> click.Command:
    command = cli.main.commands[name]
    assert isinstance(command, click.Command)
    return command


def click_options(command: click.Command) -> dict[str, tuple[bool, bool]]:
    """Every long option name of the command -> (takes a value, repeatable)."""
    options: dict[str, tuple[bool, bool]] = {}
    for param in command.params:
        if isinstance(param, click.Option):
            for name in (*param.opts, *param.secondary_opts):
                if name.startswith("--"):
                    options[name] = (not param.is_flag, bool(param.multiple))
    return options


@pytest.mark.parametrize("name", sorted(daemon_cli._COMMANDS))
def test_the_fast_paths_options_are_the_click_commands_options(name: str) -> None:
    own, fewest, most = daemon_cli._COMMANDS[name]
    command = click_command(name)
    theirs = click_options(command)
    for option, kind in {**daemon_cli._COMMON, **own}.items():
        assert option in theirs, f"{name} {option}: not an option of the click command"
        assert theirs[option] == kind, f"{name} {option}: (takes value, repeatable) differ"
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    required = sum(1 for p in arguments if p.required)
    assert (fewest, most) == (required, len(arguments)), f"{name}: positional arguments differ"


def test_the_fast_path_accepts_no_option_click_lacks() -> None:
    """The converse direction for values: an option click adds later is simply left to click
    (the fast path returns None), so nothing is answered with a meaning it does not know."""
    assert daemon_cli.parse(["query", "--no-such-option", "x"]) is None
    assert daemon_cli.parse(["status", "--help"]) is None
