"""Log lines for events that can come in floods (refusals, slow consumers,
auth failures): at most one line per kind per interval, and the next line
says how many were left out. Memory: one entry per kind, and kinds are a
fixed handful chosen by the caller (never a client-supplied value).
"""

from __future__ import annotations

import logging
import time
from typing import Any

#: Seconds between two lines of one kind: enough to see a flood start and
#: go on without a line per client.
DEFAULT_INTERVAL = 5.0


class RateLimitedLog:
    """Wraps a logger; :meth:`log` emits at most one line per ``kind`` per interval."""

    __slots__ = ("_last", "_logger", "_suppressed", "interval")

    def __init__(self, logger: logging.Logger, interval: float = DEFAULT_INTERVAL) -> None:
        self._logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(
        self, level: int, kind: str, msg: str, *args: Any, extra: dict[str, Any] | None = None
    ) -> bool:
        """Log ``msg % args`` unless a ``kind`` line went out within the interval.

        Returns True if the line was emitted. ``extra`` fields go to the
        structured log, plus ``event`` (the kind) and ``suppressed`` (lines
        of this kind left out since the last one).
        """
        if not self._logger.isEnabledFor(level):
            return False
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        self._last[kind] = now
        skipped = self._suppressed.pop(kind, 0)
        fields = {"event": kind, "suppressed": skipped, **(extra or {})}
        if skipped:
            msg += " (%d more like this since the last line)"
            args = (*args, skipped)
        self._logger.log(level, msg, *args, extra=fields)
        return True
