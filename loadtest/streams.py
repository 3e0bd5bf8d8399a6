"""One guild's verified byte stream, shared by the fleet's subscribers of it.

The server frames each event of a guild once and writes the same bytes to
every subscriber (docs/DESIGN.md, the hot path), so a fleet's subscribers of
one guild receive one byte stream, each at its own pace and cut into reads
at its own places. A :class:`Stream` holds that stream's recent frames once:
each was read whole by the subscriber that got it first (one guild, the next
``s``, every frame matched by ``wire.regular_run``'s pattern) and appended in
order. Any other subscriber's read is then checked by one comparison of its
bytes against the stream at that subscriber's offset (``bytearray.startswith``:
a ``memcmp``), and the frames it completes are counted, and their latencies
taken from the stream's ``ts`` values, in bulk. A read that is not the
stream's bytes (a HEARTBEAT_ACK, a close, a gap, a different frame) goes to
the frame-by-frame path from the start of the frame it is in, which counts
what is wrong exactly as before; so a subscriber accepts nothing here that
it would not accept frame by frame.

Bound: at most about :data:`KEEP_BYTES` twice over per guild; a subscriber
further behind than that is moved off the stream (to the frame-by-frame
path, with the part of a frame it had read), not waited for.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Protocol

#: Bytes of a stream kept behind its newest frame when it is trimmed; it is
#: trimmed once it holds twice that.
KEEP_BYTES = 128 * 1024


class Follower(Protocol):
    """A subscriber on a stream (``Sub`` in loadtest/fleet.py)."""

    rpos: int

    def unfollow(self, rest: bytes) -> None:
        """Leave the stream, keeping ``rest`` (the part of a frame already
        read) for the frame-by-frame path."""


class Stream:
    """The frames of one guild (one epoch) from ``s0`` on, in order."""

    __slots__ = ("base", "buf", "ends", "epoch", "followers", "gid", "s0", "ts")

    def __init__(self, gid: bytes, epoch: str) -> None:
        self.gid = gid
        self.epoch = epoch
        #: The frames' bytes; ``base`` is the stream offset of ``buf[0]``,
        #: the start of the frame ``s0``.
        self.buf = bytearray()
        self.base = 0
        self.s0 = 0
        #: Stream offset of each frame's end, and each frame's ``ts`` (us).
        self.ends: list[int] = []
        self.ts: list[int] = []
        self.followers: set[Follower] = set()

    @property
    def end(self) -> int:
        """The stream offset just past the newest frame."""
        return self.base + len(self.buf)

    @property
    def next_s(self) -> int:
        """The ``s`` the next frame appended must have."""
        return self.s0 + len(self.ends)

    def offset_of(self, s: int) -> int | None:
        """The stream offset where frame ``s`` starts (the end, for the next
        one), or None when the stream does not hold it."""
        i = s - self.s0
        ends = self.ends
        if not ends or i < 0 or i > len(ends):
            return None
        return ends[i - 1] if i else self.base

    def drop(self) -> None:
        """Move every follower off the stream (it is being replaced)."""
        for f in list(self.followers):
            pos = f.rpos
            start = self.frame_start(pos)
            f.unfollow(bytes(self.buf[start - self.base : pos - self.base]))

    def frame_start(self, pos: int) -> int:
        """The start of the frame that ``pos`` is in (``pos`` itself at a
        frame boundary)."""
        i = bisect_right(self.ends, pos)
        return self.ends[i - 1] if i else self.base

    def extend(self, data: bytes, stop: int, s_first: int, tss: list[int]) -> bool:
        """Append the ``len(tss)`` frames of one length that tile
        ``data[:stop]``, the first of them ``s_first``, checked whole by the
        caller; False (nothing appended) unless they are the next frames."""
        k = len(tss)
        if not k or stop % k:
            return False
        if self.ends:
            if s_first != self.next_s:
                return False
        else:
            self.s0 = s_first
        f = stop // k
        e = self.end
        self.ends.extend(range(e + f, e + f * k + 1, f))
        self.ts.extend(tss)
        self.buf += data[:stop] if stop < len(data) else data
        if len(self.buf) > 2 * KEEP_BYTES:
            self._trim()
        return True

    def _trim(self) -> None:
        """Drop frames every follower has passed, keeping at least
        :data:`KEEP_BYTES`; a follower behind the cut leaves the stream."""
        cut = self.frame_start(self.end - KEEP_BYTES)
        low = min((f.rpos for f in self.followers), default=cut)
        if low < cut:
            for f in [f for f in self.followers if f.rpos < cut]:
                pos = f.rpos
                start = self.frame_start(pos)
                f.unfollow(bytes(self.buf[start - self.base : pos - self.base]))
        else:
            cut = self.frame_start(low)
        j = bisect_right(self.ends, cut)
        if not j:
            return
        del self.buf[: cut - self.base]
        del self.ends[:j]
        del self.ts[:j]
        self.base = cut
        self.s0 += j
