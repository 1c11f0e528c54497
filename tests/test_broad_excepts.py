"""Every broad ``except`` in product code says why it is broad (issue 31, item 7).

``except Exception`` and ``suppress(Exception)`` hide bugs unless what can happen is really
that open (msgpack's many error types on junk, a third-party library's own kinds, a crash
the supervisor reports). So each one is narrowed to what can happen or carries a comment on
its line or the line before saying why it cannot be; this test keeps new ones honest.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BROAD = re.compile(r"except Exception\b|suppress\(Exception\)")


def _unexplained(path: Path, root: Path = ROOT) -> list[str]:
    lines = path.read_text().splitlines()
    found = []
    for number, line in enumerate(lines):
        if BROAD.search(line) is None:
            continue
        before = lines[number - 1].strip() if number else ""
        after = lines[number + 1].strip() if number + 1 < len(lines) else ""
        if "#" not in line and not before.startswith("#") and not after.startswith("#"):
            found.append(f"{path.relative_to(root)}:{number + 1}: {line.strip()}")
    return found


def test_every_broad_except_in_product_code_says_why() -> None:
    files = [p for package in ("wire", "dmgn", "actors") for p in (ROOT / package).rglob("*.py")]
    assert len(files) > 50
    unexplained = [place for path in sorted(files) for place in _unexplained(path)]
    assert not unexplained, "narrow these, or say beside each why it cannot be:\n" + "\n".join(
        unexplained
    )


def test_the_rule_tells_an_unexplained_one_from_an_explained_one(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("try:\n    pass\nexcept Exception:\n    pass\n")
    (tmp_path / "good.py").write_text(
        "try:\n    pass\nexcept Exception:  # msgpack raises many kinds\n    pass\n"
    )
    assert _unexplained(tmp_path / "bad.py", tmp_path) == ["bad.py:3: except Exception:"]
    assert _unexplained(tmp_path / "good.py", tmp_path) == []
