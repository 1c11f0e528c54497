"""The daemon's log lines: JSON objects with the structured fields of each call."""

from __future__ import annotations

import json
import logging
import logging.handlers
from pathlib import Path

from dmgn.app.logs import JsonFormatter
from dmgn.app.node import setup_logging
from dmgn.config import Config
from dmgn.paths import DataDir


def test_log_file_lines_are_json_with_extra_fields_and_tracebacks(tmp_path: Path) -> None:
    handlers = setup_logging(DataDir(tmp_path), Config(), foreground=False)
    try:
        log = logging.getLogger("dmgn.test")
        log.warning("restored %d memories", 3, extra={"memories": 3, "file": "/x"})
        try:
            raise ValueError("bad thing")
        except ValueError:
            log.exception("it failed")
    finally:
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()
    lines = [json.loads(line) for line in DataDir(tmp_path).log_file.read_text().splitlines()]
    assert lines[0]["msg"] == "restored 3 memories"
    assert (lines[0]["level"], lines[0]["logger"]) == ("warning", "dmgn.test")
    assert (lines[0]["memories"], lines[0]["file"]) == (3, "/x")
    assert lines[0]["ts"].endswith("+00:00")
    assert "ValueError: bad thing" in lines[1]["exc"]
    assert isinstance(handlers[0], logging.handlers.RotatingFileHandler)
    assert isinstance(handlers[0].formatter, JsonFormatter)


def test_text_format_stays_available(tmp_path: Path) -> None:
    handlers = setup_logging(DataDir(tmp_path), Config(log_format="text"), foreground=False)
    for handler in handlers:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert not isinstance(handlers[0].formatter, JsonFormatter)
