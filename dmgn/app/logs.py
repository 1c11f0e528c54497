"""Structured logs: one JSON object per line in the daemon's log file.

Each line has ``ts`` (ISO-8601 UTC with milliseconds), ``level``, ``logger``, ``msg`` (the
formatted message, as the text format shows it), and when present ``exc`` (the traceback) and
any fields passed as ``extra={...}`` to the logging call (``log.info("restored", extra={"memories":
n})``), so a log shipper gets the numbers without parsing sentences. Rotation is the file
handler's (dmgn/app/node.py), unchanged.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = (
                    value if isinstance(value, str | int | float | bool | None) else repr(value)
                )
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)
