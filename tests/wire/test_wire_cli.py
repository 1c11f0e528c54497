"""`python -m wire demo` shows an authenticated exchange and a refused impostor."""

from __future__ import annotations

import pytest

from wire.__main__ import main


def test_demo_authenticates_echoes_and_refuses_the_wrong_identity(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "sent 'hello', echoed 'hello'" in out
    assert "1 MiB round trip" in out
    assert "refused as expected: peer is a different identity" in out
