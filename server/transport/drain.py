"""Staggered drain (PROTOCOL.md "Pacing: retry hints and staggered
RECONNECT"; docs/OPERATIONS.md "Deploying without a reconnect storm").

A graceful shutdown sends RECONNECT then close 1001 to every session. Sent
all at once, every client reconnects at once: a storm on whatever takes
them (the other workers, the node started again). This module spreads them
over a window instead, in waves ``WAVE_INTERVAL`` apart: the window is the
time the sessions take to be admitted at ``admit_rate`` (so a small node
drains at once), at most ``spread`` seconds. A 1.1 session's RECONNECT also
names a suggested delay range (``min_delay_ms``, ``max_delay_ms``): its
client waits a random time in it, which smooths each wave further.

Once an identified session's RECONNECT and close frame are written, the
drain does not wait for its client's close frame (a round trip through
every client, 19,000 of them on a full node, while they also reconnect):
as soon as the peer's kernel has acknowledged every byte written
(:func:`delivered`: the transport's buffer is empty and the socket's send
queue, ``SIOCOUTQ``, is 0) the connection is closed. The client has both
frames then, whatever becomes of its own close frame (a reset from our
side, after them). A connection that never identified, or whose socket
cannot say (no descriptor, the ioctl fails), is left to its close
handshake, within ``drain_timeout`` as before.

Consistency model: runs in the gateway's event loop, owned by
``Gateway.drain``; a connection that closed while waiting its turn is
skipped. Bounded: the waves are a slice of the connection list the caller
holds; nothing is queued.
"""

from __future__ import annotations

import asyncio
import fcntl
import math
import struct
import termios
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

__all__ = [
    "ACK_POLL",
    "PEER_DRAIN_SPREAD",
    "WAVE_INTERVAL",
    "delivered",
    "drain_window",
    "reconnect_delay_ms",
    "reconnect_in_waves",
]

#: ``drain_spread`` of a node with peers (``Config.drain_spread`` None):
#: 5 s spreads a full node (19,000 sessions) at under 4,000 a second.
PEER_DRAIN_SPREAD = 5.0
#: Seconds between two waves: short enough that a wave is a few hundred
#: sessions on a full node, long enough to be one loop iteration's work.
WAVE_INTERVAL = 0.05
#: The shortest reconnect delay range (ms) a RECONNECT names: the waves
#: spread the sessions already; this spreads each wave's clients over a
#: second at least.
MIN_RECONNECT_DELAY_MS = 1000
#: Seconds between two looks at the drained connections' send queues: a
#: peer's delayed ACK is at most 40 ms on Linux, so a few looks find every
#: loopback client's, and a look at 19,000 sockets is a few milliseconds.
ACK_POLL = 0.02
#: ``SIOCOUTQ``: bytes in a socket's send queue, sent or not, not yet
#: acknowledged by the peer (Linux ``TIOCOUTQ``; the same number).
_SIOCOUTQ = termios.TIOCOUTQ
_INT = struct.Struct("i")


class Leaving(Protocol):
    closing: bool


C = TypeVar("C", bound=Leaving)


def drain_window(sessions: int, spread: float, admit_rate: float) -> float:
    """Seconds to spread ``sessions`` RECONNECTs over: as long as admitting
    them at ``admit_rate`` takes (all at once when the rate is unlimited),
    at most ``spread``."""
    if sessions <= 1 or spread <= 0 or admit_rate <= 0:
        return 0.0
    return min(spread, sessions / admit_rate)


def reconnect_delay_ms(sessions: int, window: float, admit_rate: float) -> tuple[int, int]:
    """The delay range a RECONNECT suggests: what the waves do not spread
    of the time ``sessions`` take to be admitted at ``admit_rate`` (a lone
    node sends them all at once: its clients are spread over that whole
    time, which is when the node started again can take them), at least
    ``MIN_RECONNECT_DELAY_MS``. Arriving faster than admission serves them
    would only fill the kernel's accept queue, whose overflow costs a
    client seconds of TCP retransmission."""
    rest = sessions / admit_rate - window if admit_rate > 0 else 0.0
    return 0, max(MIN_RECONNECT_DELAY_MS, int(1000 * rest))


async def reconnect_in_waves(conns: Sequence[C], window: float, send: Callable[[C], None]) -> None:
    """Call ``send`` for every connection still open, the first wave now
    and the rest spread evenly over ``window`` seconds."""
    waves = max(1, min(len(conns), math.ceil(window / WAVE_INTERVAL)))
    per = math.ceil(len(conns) / waves) if conns else 0
    start = time.monotonic()
    for k in range(waves):
        if k:
            await asyncio.sleep(max(0.0, start + k * window / waves - time.monotonic()))
        for conn in conns[k * per : (k + 1) * per]:
            if not conn.closing:
                send(conn)


class Sending(Protocol):
    def get_write_buffer_size(self) -> int: ...

    def get_extra_info(self, name: str, default: object = None) -> object: ...


def delivered(transport: Sending) -> bool:
    """True when every byte written to ``transport`` has been acknowledged
    by the peer: nothing left in its buffer or in the socket's send queue.
    False when the socket cannot say."""
    if transport.get_write_buffer_size():
        return False
    sock = transport.get_extra_info("socket")
    fileno = getattr(sock, "fileno", None)
    if fileno is None:
        return False
    try:
        fd = fileno()
        if fd < 0:
            return False
        queued: int = _INT.unpack(fcntl.ioctl(fd, _SIOCOUTQ, _INT.pack(0)))[0]
    except (OSError, ValueError):
        return False
    return queued == 0
