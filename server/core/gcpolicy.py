"""The cyclic garbage collector's schedule for a serving process.

A node holds tens of thousands of long-lived objects per thousand
connections (transports, sessions, websockets protocols, guild members),
and allocates many short-lived ones per handshake. With CPython's default
schedule (a young collection every 700 net allocations, a full one every
70,000 once the heap has grown by a quarter) the collector walked every
connection again and again as they arrived: py-spy put ``gc_collect_main``
at 19% of the server's CPU while 19,900 clients connected (docs/BENCHMARKS.md, issue 14).

:func:`tune`, called once the node has started, moves everything that
exists then (modules, classes, the node's own structures) to the
permanent generation (``gc.freeze``), so no collection walks it again, and
collects the young generation every :data:`YOUNG_THRESHOLD` allocations.
Measured on that run (``gc.callbacks``): the default schedule spent 0.9 s
of 4.6 s in seven full collections (after a freeze CPython's "heap grew
by a quarter" rule is always true, so every old-generation threshold
became a full walk of every connection); this one spends 0.1 s, all young.

Memory model: reference counting still frees every acyclic object at once;
only garbage in reference cycles waits for a collection, and the gateway
makes little (1,789 cyclic objects collected over 19,900 handshakes): a
young collection every :data:`YOUNG_THRESHOLD` container allocations, a
middle one every ``YOUNG_THRESHOLD * MIDDLE_THRESHOLD``, a full one when
the old generation's threshold and CPython's quarter rule both say so.
No queue, no state of our own.
"""

from __future__ import annotations

import gc

#: Net container allocations between young collections (CPython: 700). At
#: about 170 per handshake this is one young collection per 300 handshakes
#: instead of one per 4; a young collection
#: walks at most ~50,000 objects (about 1.5 ms), and the total young cost is
#: the same as CPython's, as it is proportional to what is allocated.
YOUNG_THRESHOLD = 50_000
#: Young collections per middle one (CPython: 10): a middle collection
#: walks what survived a young one, so every million allocations, not every
#: 500,000 (each costs tens of milliseconds with 20,000 connections).
MIDDLE_THRESHOLD = 20
#: Middle collections per full one (CPython's default).
OLD_THRESHOLD = 10


def tune() -> None:
    """Freeze what exists now and set the serving schedule (idempotent)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, OLD_THRESHOLD)
