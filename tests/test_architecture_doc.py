"""docs/architecture.md's layer diagram names every module, in its layer (issue 31, item 9).

The diagram is the fenced block under "## Layers". A package is named with a slash (`actors/`,
`dmgn/`, `dmgn/app/`, `wire/`, or as the start of a path such as `actors/node.py`); a module is
named `name.py`, and belongs to the package named last before it. Layers are the diagram's
sections between lines holding only the arrow `│`.

The names must equal the tree's .py files of each package (`__init__` and `__main__` aside),
and the layers of `actors/` and `dmgn/` must follow pyproject.toml's exhaustive contracts: the
modules of one contract layer in one section, the sections in the contract's order.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
#: The packages whose modules the diagram must list exactly.
CHECKED = ("actors", "dmgn", "dmgn/app", "wire")
#: Named in the diagram as layers, their modules not listed.
NAMED_ONLY = ("sims", "benchmarks")

_TOKEN = re.compile(
    r"(?<![\w/.-])(?P<package>dmgn/app|actors|dmgn|wire|sims|benchmarks)/(?P<module>\w+)?(?:\.py)?"
    r"|(?<![\w/.-])(?P<bare>\w+)\.py\b"
)
_ARROW = re.compile(r"^\s*│\s*$")


def diagram(text: str) -> str:
    """The fenced block under the "## Layers" heading."""
    section = text.split("\n## Layers\n", 1)[1]
    return section.split("```\n", 2)[1]


def diagram_modules(block: str) -> dict[str, dict[str, int]]:
    """package -> {module: section index} for every module the diagram names."""
    found: dict[str, dict[str, int]] = {package: {} for package in CHECKED + NAMED_ONLY}
    package: str | None = None
    section = 0
    for number, line in enumerate(block.splitlines(), 1):
        if _ARROW.match(line):
            section += 1
            continue
        for match in _TOKEN.finditer(line):
            if match["package"]:
                package = match["package"]
                module = match["module"]
            else:
                module = match["bare"]
                if package is None:
                    raise AssertionError(f"diagram line {number}: {module}.py before any package")
            if module:
                assert package is not None
                found[package][module] = section
    return found


def tree_modules(root: Path) -> dict[str, set[str]]:
    """package -> the names of its .py files (not `__init__`, `__main__`)."""
    return {
        package: {
            path.stem for path in (root / package).glob("*.py") if not path.stem.startswith("__")
        }
        for package in CHECKED
    }


def differences(named: dict[str, dict[str, int]], tree: dict[str, set[str]]) -> list[str]:
    problems = []
    for package in CHECKED:
        missing = sorted(tree[package] - named[package].keys())
        stale = sorted(named[package].keys() - tree[package])
        if missing:
            problems.append(f"{package}/: in the tree, not in the diagram: {', '.join(missing)}")
        if stale:
            problems.append(f"{package}/: in the diagram, not in the tree: {', '.join(stale)}")
    return problems


def layer_order(
    named: dict[str, dict[str, int]], pyproject: dict[str, Any], container: str
) -> list[str]:
    """Where the diagram's sections disagree with the exhaustive contract of `container`."""
    contracts = pyproject["tool"]["importlinter"]["contracts"]
    (contract,) = [c for c in contracts if c.get("containers") == [container]]
    problems = []
    previous = -1
    for layer in contract["layers"]:
        modules = [name.strip() for name in re.split(r"[|:]", layer)]
        sections: set[int] = set()
        for module in modules:
            if module == "app":  # the subpackage: its modules are listed under dmgn/app/
                sections |= set(named["dmgn/app"].values())
            elif module in named[container]:
                sections.add(named[container][module])
        if len(sections) != 1:
            spans = sorted(sections)
            problems.append(f"{container} layer {layer!r} spans diagram sections {spans}")
        elif (section := sections.pop()) <= previous:
            problems.append(f"{container} layer {layer!r} is not below the layer above it")
        else:
            previous = section
    return problems


def _named() -> dict[str, dict[str, int]]:
    return diagram_modules(diagram(DOC.read_text()))


def test_the_diagram_names_every_module_of_the_tree_and_no_other() -> None:
    assert differences(_named(), tree_modules(ROOT)) == []


def test_the_diagram_places_each_module_in_its_contract_layer() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    named = _named()
    assert layer_order(named, pyproject, "actors") + layer_order(named, pyproject, "dmgn") == []


def test_a_module_added_to_the_tree_or_gone_from_it_is_named(tmp_path: Path) -> None:
    for package, modules in tree_modules(ROOT).items():
        (tmp_path / package).mkdir(parents=True, exist_ok=True)
        for module in modules:
            (tmp_path / package / f"{module}.py").touch()
    (tmp_path / "actors" / "_new_helper.py").touch()
    (tmp_path / "dmgn" / "app" / "newcmd.py").touch()
    (tmp_path / "dmgn" / "feed.py").unlink()
    assert differences(_named(), tree_modules(tmp_path)) == [
        "actors/: in the tree, not in the diagram: _new_helper",
        "dmgn/: in the diagram, not in the tree: feed",
        "dmgn/app/: in the tree, not in the diagram: newcmd",
    ]


def test_a_module_drawn_in_the_wrong_layer_is_named() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    block = diagram(DOC.read_text())
    # The store drawn among the private helpers, and a domain module above the entry points.
    moved = block.replace("vault.py · store.py", "vault.py").replace(
        "_store_tables.py (store)", "_store_tables.py · store.py"
    )
    moved = "dmgn/  crypto.py\n│\n" + moved.replace("· crypto.py ", "")
    named = diagram_modules(moved)
    assert differences(named, tree_modules(ROOT)) == []
    assert layer_order(named, pyproject, "actors") != []
    assert layer_order(named, pyproject, "dmgn") != []


def test_the_parser_reads_packages_paths_and_bare_names() -> None:
    block = "top  dmgn/app/  cli.py · x.py (`dmgn add`)\n   │\nmid  actors/node.py  y.py\n"
    named = diagram_modules(block)
    assert named["dmgn/app"] == {"cli": 0, "x": 0}
    assert named["actors"] == {"node": 1, "y": 1}
    assert named["dmgn"] == {}
