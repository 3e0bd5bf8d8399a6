"""Process-wide logging setup for ``guildcast serve``: text or JSON lines.

``setup(level, "json")`` makes every log record one JSON object on one line
of stderr: ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``,
``msg`` (the formatted message), the record's ``extra`` fields (for example
``guild``, ``peer``, ``code``, ``event``, ``suppressed``), and ``exc`` with
the traceback when there is one. ``"text"`` is the classic one-line format,
with the extra fields appended as ``key=value``.

Embedding applications keep their own logging; nothing here runs on import.
What is logged: starts and stops, drains, refused connections, slow
consumers, authentication failures (gateway and API), guild crashes,
journal repairs and storage errors, each at most once per few seconds per
kind when they come in floods (``guildcast.core.ratelog``); never a line per
message or per event.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

FORMATS = ("text", "json")

#: Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for its fields)."""

    def format(self, record: logging.LogRecord) -> str:
        secs = time.gmtime(record.created)
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", secs) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        # default=str: an extra field that is not JSON (a path, an exception)
        # is written as its text rather than losing the line.
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if not extras:
            return line
        fields = " ".join(f"{k}={v}" for k, v in extras.items())
        head, sep, tail = line.partition("\n")  # keep a traceback below the fields
        return f"{head} {fields}{sep}{tail}"


def setup(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every log record at ``level`` or above to ``stream`` (stderr) as ``fmt``.

    Raises ValueError for an unknown level or format. Replaces the handlers
    of the root logger (call it once, from the command line entry point).
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(numeric)
    # aiohttp logs every unhandled protocol error at ERROR and access lines at
    # INFO; the API's middleware reports what matters at our level.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
