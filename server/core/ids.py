"""Random identifiers from one read of the system's CSPRNG per many ids.

Every accepted connection gets a session id (``secrets.token_hex(8)``:
one ``getrandom`` system call each). System calls are dear on this
machine class: py-spy put ``getrandom`` at 5% of the server's CPU while
19,900 clients connected (docs/BENCHMARKS.md, issue 14). :class:`HexIds`
reads :data:`BATCH` bytes from ``os.urandom`` at a time and hands them out
in order, each byte once, so the ids are exactly as unpredictable as
``token_hex``'s (the same source, never reused). Bound: one buffer of
:data:`BATCH` bytes per pool; it is refilled when empty.
"""

from __future__ import annotations

import os

#: Bytes read per system call: 512 ids of 8 bytes.
BATCH = 4096


class HexIds:
    """Hex strings of ``nbytes`` random bytes each (``token_hex(nbytes)``)."""

    __slots__ = ("_at", "_buf", "_n")

    def __init__(self, nbytes: int) -> None:
        if not 0 < nbytes <= BATCH:
            raise ValueError(f"nbytes must be in 1..{BATCH}")
        self._n = nbytes
        self._buf = b""
        self._at = 0

    def next(self) -> str:
        at = self._at
        end = at + self._n
        if end > len(self._buf):
            self._buf = os.urandom(BATCH - BATCH % self._n)
            at, end = 0, self._n
        self._at = end
        return self._buf[at:end].hex()
