"""Pacing hints the server gives a client (PROTOCOL.md "Pacing: retry hints
and staggered RECONNECT", protocol 1.1): how long to wait before connecting
again.

Two carriers, one shape, a delay range ``[min_ms, max_ms]`` the client picks
a uniformly random wait from:

- the reason of a close 1013 (admission control, "server full"):
  ``"<why>; retry in MIN-MAX ms"``, read back by :func:`parse_retry`;
- the ``d`` of RECONNECT (op 7) sent to a 1.1 session (subprotocol
  ``guildcast.v1``): ``{"min_delay_ms": MIN, "max_delay_ms": MAX}``, read
  back by :func:`parse_reconnect`. A 1.0 session gets ``d: null`` as before.

Pure functions, no state; both clients and the harness use them.
"""

from __future__ import annotations

import re
from typing import Any

from guildcast.protocol import wire
from guildcast.protocol.codes import Op

__all__ = [
    "MAX_HINT_MS",
    "parse_reconnect",
    "parse_retry",
    "reconnect_frame",
    "retry_reason",
]

#: The longest wait a hint may name (ms): a client never trusts more, so a
#: bad hint cannot park it for long.
MAX_HINT_MS = 60_000
_RETRY_RE = re.compile(r"retry in (\d{1,9})-(\d{1,9}) ms")


def _clamp(lo: int, hi: int) -> tuple[int, int]:
    lo = max(0, min(int(lo), MAX_HINT_MS))
    hi = max(lo, min(int(hi), MAX_HINT_MS))
    return lo, hi


def retry_reason(why: str, min_ms: int, max_ms: int) -> str:
    """The reason of a close 1013 carrying a retry hint (under the 123 bytes
    a close reason may hold for any ``why`` up to 80 characters)."""
    lo, hi = _clamp(min_ms, max_ms)
    return f"{why[:80]}; retry in {lo}-{hi} ms"


def parse_retry(reason: str) -> tuple[int, int] | None:
    """The ``(min_ms, max_ms)`` of a close reason, or None if it has none."""
    m = _RETRY_RE.search(reason)
    if m is None:
        return None
    return _clamp(int(m.group(1)), int(m.group(2)))


def reconnect_frame(min_ms: int, max_ms: int) -> bytes:
    """RECONNECT (op 7) with a suggested delay range, for a 1.1 session."""
    lo, hi = _clamp(min_ms, max_ms)
    return wire.message(Op.RECONNECT, {"min_delay_ms": lo, "max_delay_ms": hi})


def parse_reconnect(d: Any) -> tuple[int, int] | None:
    """The delay range of a RECONNECT's ``d``, or None (``null``, or not the shape)."""
    if type(d) is not dict:
        return None
    lo, hi = d.get("min_delay_ms"), d.get("max_delay_ms")
    if type(lo) is not int or type(hi) is not int:
        return None
    return _clamp(lo, hi)
