"""What one small loopback write costs on this machine: the floor under
every per-delivery figure in docs/BENCHMARKS.md.

A writer (an asyncio ``Protocol`` server on uvloop, as the gateway is)
pinned to one CPU writes 204-byte frames (a 200-byte event with its
WebSocket header) to ``--conns`` loopback connections, one ``transport.write``
per frame, in groups of ``--group`` connections; a reader process pinned to
the other CPU drains every connection. Two modes:

- ``busy``: the writer writes back to back, so the reader is always busy
  and rarely needs to be woken;
- ``paced``: the writer spends ``--pace-us`` of pure-Python work between
  groups (as the server does between events), so the reader drains
  everything, goes back to sleep, and each write must wake it again.

It prints the writer's CPU time (user + system) per write in each mode:
the writer thread's own CPU clock (``time.thread_time``) over the mode,
minus the same clock over the pacing spins. Both are CPU time of one
thread, so other load on the machine (which stretches wall time, not the
thread's CPU time) cannot make the figure negative or inflate it. Loopback
only, bounded in time (``--seconds`` per mode), stops by itself:

    guildcast loadtest sendcost
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import selectors
import socket
import time
from collections.abc import Sequence

import uvloop

PROG = "guildcast loadtest sendcost"

FRAME = b"\x81\x7e\x00\xc8" + b"x" * 200


def _reader(port: int, conns: int, cpu: int | None) -> None:
    """Connect ``conns`` sockets and drain them until the writer closes them."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    open_ = conns
    while open_:
        for key, _ in sel.select(5.0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(1 << 16)
            except ConnectionError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()
                open_ -= 1


def per_write_us(cpu: float, spun: float, writes: int) -> float:
    """Microseconds of writer CPU per write: the thread's CPU seconds over a
    mode (``cpu``) less those it spent pacing (``spun``, a sub-interval of
    the same clock, so never larger), over the writes."""
    if writes <= 0:
        raise ValueError("no write was made")
    if not 0.0 <= spun <= cpu:
        raise ValueError(f"pacing CPU {spun} s is not within the mode's CPU {cpu} s")
    return (cpu - spun) / writes * 1e6


async def _measure(args: argparse.Namespace, children: list[int]) -> dict[str, float]:
    if args.writer_cpu is not None:
        os.sched_setaffinity(0, {args.writer_cpu})
    loop = asyncio.get_running_loop()
    transports: list[asyncio.Transport] = []
    all_in = loop.create_future()

    class Sink(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.append(transport)  # type: ignore[arg-type]
            if len(transports) == args.conns and not all_in.done():
                all_in.set_result(None)

    server = await loop.create_server(Sink, "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    pid = os.fork()
    children.append(pid)
    if pid == 0:  # the reader
        try:
            _reader(port, args.conns, args.reader_cpu)
        finally:
            os._exit(0)
    try:
        await asyncio.wait_for(all_in, 60)
        out: dict[str, float] = {}
        for mode, pace in (("busy", 0.0), ("paced", args.pace_us / 1e6)):
            writes = 0
            spun = 0.0  # CPU seconds of this thread spent pacing, not writing
            cpu0 = time.thread_time()
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                for g in range(0, args.conns, args.group):
                    for t in transports[g : g + args.group]:
                        t.write(FRAME)
                    writes += len(transports[g : g + args.group])
                    if pace:
                        s0 = time.thread_time()
                        stop = time.perf_counter() + pace
                        while time.perf_counter() < stop:
                            pass
                        spun += time.thread_time() - s0
                    if writes % 2000 < args.group:
                        await asyncio.sleep(0)  # let uvloop flush what the kernel refused
            out[mode] = per_write_us(time.thread_time() - cpu0, spun, writes)
            await asyncio.sleep(0.5)  # the reader drains
        return out
    finally:
        for t in transports:
            t.close()
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``guildcast loadtest sendcost``: prints one line per mode; 0."""
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=2000, help="loopback connections (default 2000)")
    ap.add_argument(
        "--group", type=int, default=10, help="writes per group (default 10: a guild of 10)"
    )
    ap.add_argument(
        "--pace-us", type=float, default=200.0, help="Python work between groups in paced mode"
    )
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per mode (default 3)")
    ap.add_argument("--writer-cpu", type=int, default=0)
    ap.add_argument("--reader-cpu", type=int, default=1)
    args = ap.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.conns + 64 > hard:
        ap.error(f"--conns {args.conns} needs {args.conns + 64} open files; the limit is {hard}")
    children: list[int] = []
    try:
        result = uvloop.run(_measure(args, children))
    finally:
        for pid in children:  # the reader ends once its connections close
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    for mode, us in result.items():
        print(f"{mode:6s} writer CPU per write: {us:6.2f} us")
    return 0
