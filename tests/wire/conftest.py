"""Make ``import wire`` resolve to the package, not to this test directory.

With pytest's default ``prepend`` import mode, ``tests/conftest.py`` puts
``tests/`` on ``sys.path``; ``tests/wire/`` (no ``__init__.py``) then shadows
the editable-installed ``wire`` package as an empty namespace package, so
``from wire import X`` fails. The project-level fix is ``pythonpath = ["."]``
(or ``--import-mode=importlib``) in the pytest config; until then, put the
repository root first and drop a shadowing namespace module if one was made.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parents[2])
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)
if getattr(sys.modules.get("wire"), "__file__", "") is None:
    for _name in [n for n in sys.modules if n == "wire" or n.startswith("wire.")]:
        del sys.modules[_name]
