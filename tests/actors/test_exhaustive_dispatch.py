"""Every actor's dispatch handles every message its mailbox can carry (issue 31, item 1).

An actor that silently drops a message type leaves its caller waiting for a timeout. Two
checks, both read from the source (no actor runs):

* each message type in the union a ``Mailbox[...]`` is declared with has a ``case`` in one
  ``match`` of that module: deleting a ``case`` fails this test at once;
* that ``match`` ends with ``case _: assert_never(...)``, so ``mypy --strict`` fails too when a
  message type is added to the union and not handled.

A union is followed through module-level aliases (imported ones too), ``Request[X, ...]`` (the
service's envelope: its dispatch matches on ``X``) and ``module.Name`` references into our own
packages.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ACTORS = sorted(p for p in (ROOT / "actors").glob("*.py") if not p.name.startswith("_"))


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _module_path(dotted: str) -> Path | None:
    path = ROOT.joinpath(*dotted.split(".")).with_suffix(".py")
    return path if path.exists() else None


def _imports(path: Path) -> dict[str, str]:
    """Local name -> the dotted module it stands for (``from dmgn import api`` -> dmgn.api)."""
    names: dict[str, str] = {}
    for node in _tree(path).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name] = alias.name
    return names


def _aliases(path: Path) -> dict[str, ast.expr]:
    found: dict[str, ast.expr] = {}
    for node in _tree(path).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                found[target.id] = node.value
    return found


def _members(expr: ast.expr, path: Path) -> frozenset[str]:
    """The class names a type expression stands for, aliases followed."""
    match expr:
        case ast.BinOp(left, ast.BitOr(), right):
            return _members(left, path) | _members(right, path)
        case ast.Subscript(ast.Name("Request"), ast.Tuple([first, *_])):
            return _members(first, path)
        case ast.Name(name):
            value = _aliases(path).get(name)
            if value is not None:
                return _members(value, path)
            module, _, imported = _imports(path).get(name, "").rpartition(".")
            other = _module_path(module) if module else None
            value = _aliases(other).get(imported) if other else None
            return frozenset({name}) if value is None or other is None else _members(value, other)
        case ast.Attribute(ast.Name(module), name):
            other = _module_path(_imports(path).get(module, module))
            if other is None:
                return frozenset({name})
            value = _aliases(other).get(name)
            return frozenset({name}) if value is None else _members(value, other)
    raise AssertionError(f"{path.name}: cannot read the type {ast.unparse(expr)}")


def _mailbox_unions(path: Path) -> list[tuple[str, frozenset[str]]]:
    """(declared type, its members) of each inbox an actor declares as its own
    (``self.<name>: Mailbox[...]``) with a union in it; the tree that makes other actors'
    mailboxes (node.py) has them checked in their own modules."""
    unions: list[tuple[str, frozenset[str]]] = []
    for node in ast.walk(_tree(path)):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Attribute)
            and ast.unparse(node.target.value) == "self"
        ):
            annotation = node.annotation
            if isinstance(annotation, ast.BinOp):  # ``Mailbox[X] | None``
                annotation = annotation.left
            if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Mailbox":
                members = _members(annotation.slice, path)
                if len(members) > 1:
                    unions.append((ast.unparse(annotation.slice), members))
    return unions


def _class_name(pattern: ast.pattern) -> frozenset[str]:
    match pattern:
        case ast.MatchClass(cls):
            return frozenset({cls.attr if isinstance(cls, ast.Attribute) else ast.unparse(cls)})
        case ast.MatchOr(patterns):
            return frozenset().union(*(_class_name(p) for p in patterns))
        case ast.MatchAs(pattern=inner) if inner is not None:
            return _class_name(inner)
    return frozenset()


@dataclass(frozen=True)
class _Dispatch:
    line: int
    handled: frozenset[str]
    ends_with_assert_never: bool


def _dispatches(path: Path) -> list[_Dispatch]:
    found = []
    for node in ast.walk(_tree(path)):
        if not isinstance(node, ast.Match):
            continue
        handled = frozenset().union(*(_class_name(case.pattern) for case in node.cases))
        last = node.cases[-1]
        wildcard = isinstance(last.pattern, ast.MatchAs) and last.pattern.pattern is None
        calls_never = any(
            isinstance(n, ast.Call) and ast.unparse(n.func) == "assert_never"
            for n in ast.walk(ast.Module(body=last.body, type_ignores=[]))
        )
        found.append(_Dispatch(node.lineno, handled, wildcard and calls_never))
    return found


CASES = [(path, name, members) for path in ACTORS for name, members in _mailbox_unions(path)]


def test_every_actor_with_a_message_union_is_checked() -> None:
    """The reader finds the unions (an empty list would make the test below prove nothing)."""
    checked = {path.stem for path, _, _ in CASES}
    assert {"vault", "store", "indexer", "gossip", "discovery", "transport", "storage"} <= checked
    assert {"shard_keeper", "router", "peering", "service"} <= checked


@pytest.mark.parametrize(
    ("path", "declared", "members"),
    CASES,
    ids=[f"{path.stem}:{declared}" for path, declared, _ in CASES],
)
def test_dispatch_handles_every_message_and_ends_in_assert_never(
    path: Path, declared: str, members: frozenset[str]
) -> None:
    dispatches = [d for d in _dispatches(path) if d.handled & members]
    assert dispatches, f"{path.name}: no match handles any of {sorted(members)}"
    best = max(dispatches, key=lambda d: len(d.handled & members))
    missing = members - best.handled
    assert not missing, (
        f"{path.name}:{best.line}: the dispatch on {declared} has no case for "
        f"{sorted(missing)}: a caller sending one would wait for its timeout"
    )
    assert best.ends_with_assert_never, (
        f"{path.name}:{best.line}: the dispatch on {declared} must end with "
        "`case _: assert_never(message)` so mypy --strict finds a message type left unhandled"
    )


def test_the_check_fails_when_a_case_is_removed(tmp_path: Path) -> None:
    """The check itself: a copy of the vault with its ``Whoami`` case removed is caught."""
    source = (ROOT / "actors" / "vault.py").read_text()
    start = source.index("                case Whoami():")
    end = source.index("                case _:", start)
    broken = tmp_path / "vault.py"
    broken.write_text(source[:start] + source[end:])
    ((_, members),) = _mailbox_unions(broken)
    best = max(_dispatches(broken), key=lambda d: len(d.handled & members))
    assert members - best.handled == {"Whoami"}
