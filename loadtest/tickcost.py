"""What one passive-notice tick costs in Python, without the writes: the
ticker's share of the passive mix's CPU in docs/BENCHMARKS.md "Passive
subscriptions".

A :class:`~guildcast.actors.passive.PassiveBoard` of ``--sessions``
sessions, each passive in ``--per-session`` of ``--guilds`` guilds (session
i in guilds i, i + G/n, ... as the harness's ``passive`` scenario assigns
them), runs ``--ticks`` ticks; before each, every guild's head moves with
probability ``--moved`` (0.632: one event per guild per interval, Poisson).
The sessions only count the bytes they are handed (no socket, no syscall),
so the figure is the tick's own work: visiting the moved guilds' passive
subscriptions, grouping them per session, building the frames. It prints,
for single notices and for batched ones (IDENTIFY ``activity_batch``), the
thread CPU time of the fastest and the median tick and the notice bytes per
session per tick. The thread's own CPU clock (``time.thread_time``) is not
stretched by other load on the machine. In process, bounded, stops by
itself:

    guildcast loadtest tickcost
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Sequence

from guildcast.actors.passive import PassiveBoard
from guildcast.protocol.deflate import Deflater

PROG = "guildcast loadtest tickcost"
#: A 16-hex-digit epoch, as a node names one.
EPOCH = "0123456789abcdef"
#: Most sessions and ticks: the run stays bounded in memory and time.
MAX_SESSIONS = 200_000
MAX_TICKS = 1000


class CountingSink:
    """A passive session that only counts what it is sent (``core.sink.Sink``)."""

    __slots__ = ("activity_batch", "bytes", "deflate", "events", "is_closed")

    def __init__(self, batch: bool) -> None:
        self.activity_batch = batch
        self.deflate: Deflater | None = None
        self.events: frozenset[str] | None = None
        self.is_closed = False
        self.bytes = 0

    def send(self, data: bytes) -> None:
        self.bytes += len(data)

    def close(self, code: int, reason: str) -> None:
        self.is_closed = True


async def _measure(args: argparse.Namespace, batch: bool) -> tuple[float, float, float]:
    rng = random.Random(args.seed)
    board = PassiveBoard(1.0)
    sinks = [CountingSink(batch) for _ in range(args.sessions)]
    entries = [board.attach(f"lt-{g}", EPOCH, 0) for g in range(args.guilds)]
    stride = max(1, args.guilds // (args.per_session + 1))
    for i, sink in enumerate(sinks):
        for k in range(1, args.per_session + 1):  # guild i itself is the active one
            entries[(i + k * stride) % args.guilds].sinks[sink] = None
    times: list[float] = []
    for _ in range(args.ticks):
        for e in entries:
            if rng.random() < args.moved:
                e.head += 1
        t = time.thread_time()
        await board.tick()
        times.append(time.thread_time() - t)
    per_session = sum(s.bytes for s in sinks) / args.ticks / args.sessions
    return min(times) * 1000, statistics.median(times) * 1000, per_session


def main(argv: Sequence[str] | None = None) -> int:
    """``guildcast loadtest tickcost``: prints one line per notice form; 0."""
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=10_000, help="passive sessions (10000)")
    ap.add_argument("--guilds", type=int, default=1000, help="guilds (1000)")
    ap.add_argument("--per-session", type=int, default=19, help="passive guilds a session (19)")
    ap.add_argument("--moved", type=float, default=0.632, help="share of guilds moved a tick")
    ap.add_argument("--ticks", type=int, default=15, help="ticks measured (15)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if not 1 <= args.sessions <= MAX_SESSIONS or not 1 <= args.ticks <= MAX_TICKS:
        ap.error(f"--sessions must be 1..{MAX_SESSIONS} and --ticks 1..{MAX_TICKS}")
    if not 1 <= args.per_session <= args.guilds or not 0 <= args.moved <= 1:
        ap.error("--per-session must be 1..guilds and --moved in [0, 1]")
    for batch in (False, True):
        fastest, median, per_session = asyncio.run(_measure(args, batch))
        form = "batch " if batch else "single"
        print(
            f"{form} tick CPU: {fastest:7.2f} ms fastest, {median:7.2f} ms median; "
            f"{per_session:6.1f} notice bytes per session"
        )
    return 0
