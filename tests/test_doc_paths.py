"""Every repository path the docs name exists (issue 31, item 9).

A path is a word starting with one of the repository's top directories (`actors/`, `dmgn/`,
`tests/`, ...) that ends in a file name with a known extension (`dmgn/app/cli.py`,
`tests/storage/test_storage_restore.py::test_x`) or in a slash (`benchmarks/results/`). Paths
with a wildcard are patterns, not files; words such as the gossip topic `dmgn/memories/1.0.0`
or a data dir's `logs/dmgn-node.log` are not repository paths and are not matched.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md", ROOT / "sims" / "README.md"]
TOP = ("actors", "benchmarks", "dmgn", "docs", "examples", "scripts", "sims", "tests", "wire")
EXTENSIONS = {"py", "md", "json", "jsonl", "toml", "txt", "png", "sh", "yml", "yaml", "csv"}
#: Named on purpose although absent from the repository, with the reason.
NOT_IN_THE_REPO = {"benchmarks/out/": "where the benchmarks write by default (gitignored)"}

_PATH = re.compile(rf"(?<![\w/.~-])((?:{'|'.join(TOP)})/[\w./*-]*)")


def named_paths(text: str) -> list[tuple[int, str]]:
    """(line number, path) for every repository path the text names."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in _PATH.finditer(line):
            path = match[1].rstrip(".")
            name = path.rsplit("/", 1)[1]
            if "*" in path:
                continue
            if path.endswith("/") or ("." in name and name.rsplit(".", 1)[1] in EXTENSIONS):
                found.append((number, path))
    return found


def missing_paths(text: str, root: Path) -> list[str]:
    return [
        f"line {number}: {path}"
        for number, path in named_paths(text)
        if path not in NOT_IN_THE_REPO and not (root / path).exists()
    ]


def test_every_path_the_docs_name_exists() -> None:
    missing = {
        str(doc.relative_to(ROOT)): problems
        for doc in DOCS
        if (problems := missing_paths(doc.read_text(), ROOT))
    }
    assert missing == {}


def test_the_docs_name_paths_at_all() -> None:
    assert sum(len(named_paths(doc.read_text())) for doc in DOCS) > 200


def test_a_path_that_is_gone_is_named() -> None:
    text = (
        "See `dmgn/app/cli.py` and tests/storage/test_storage_restore.py::test_x, and\n"
        "`dmgn/mcp_stdio.py` (moved), the topic `dmgn/memories/1.0.0`, `logs/dmgn-node.log`,\n"
        "benchmarks/results/attack_*.md and docs/gone/.\n"
    )
    assert named_paths(text) == [
        (1, "dmgn/app/cli.py"),
        (1, "tests/storage/test_storage_restore.py"),
        (2, "dmgn/mcp_stdio.py"),
        (3, "docs/gone/"),
    ]
    assert missing_paths(text, ROOT) == ["line 2: dmgn/mcp_stdio.py", "line 3: docs/gone/"]


#: The design and style texts the project was built to live outside the repository: a doc or
#: comment that cites them sends a newcomer to a file they do not have (docs/design.md says
#: what the design asked for). Spelt in pieces so that this file does not cite them either.
_DESIGN, _STYLE, _SHARED = "DESI" + "GN", "STY" + "LE", "../" + "shared"
_OUTSIDE = re.compile(
    rf"\b{_DESIGN}(\.md\b|\s+(§|section|\d))|\b{_STYLE}\.md\b|{re.escape(_SHARED)}"
)


def outside_citations(root: Path) -> list[str]:
    files = [root / "README.md", root / "sims" / "README.md"]
    for folder, pattern in [("docs", "*.md"), ("benchmarks/results", "*.md")]:
        files += (root / folder).glob(pattern)
    for package in TOP:
        files += (root / package).rglob("*.py")
    return [
        f"{path.relative_to(root)}:{number}: {line.strip()}"
        for path in sorted(set(files))
        if path.exists()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _OUTSIDE.search(line)
    ]


def test_nothing_cites_a_file_outside_the_repository() -> None:
    assert outside_citations(ROOT) == []


def test_a_citation_of_the_design_or_the_shared_folder_is_found(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "actors").mkdir()
    (tmp_path / "docs" / "x.md").write_text(f"As {_DESIGN} §6 asks.\nSee {_SHARED}/vectors.\n")
    (tmp_path / "actors" / "x.py").write_text(f'"""As {_DESIGN}.md section 2 says."""\n')
    (tmp_path / "actors" / "y.py").write_text('"""A DESIGNER, designed; docs/design.md."""\n')
    assert outside_citations(tmp_path) == [
        f'actors/x.py:1: """As {_DESIGN}.md section 2 says."""',
        f"docs/x.md:1: As {_DESIGN} §6 asks.",
        f"docs/x.md:2: See {_SHARED}/vectors.",
    ]
