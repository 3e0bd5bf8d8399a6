"""Phase timings of a node's stop (docs/OPERATIONS.md "Signals and
draining"): how long the drain, the HTTP API, the guilds and the broker
each took, for the "node stopped" INFO line (``stop_seconds``,
``stop_phases``).

Consistency model: one owner (``Server.stop``), one event loop; a handful
of phases, so the list is bounded by the code that marks them.
"""

from __future__ import annotations

import time

__all__ = ["StopClock"]


class StopClock:
    """Seconds between successive :meth:`mark` calls, by phase name."""

    def __init__(self) -> None:
        self._start = self._last = time.monotonic()
        self.seconds: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[phase] = round(now - self._last, 3)
        self._last = now

    @property
    def total(self) -> float:
        """Seconds since the clock was made."""
        return round(time.monotonic() - self._start, 3)
