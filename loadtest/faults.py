"""``guildcast loadtest faults``: cluster fault injection, one table of outcomes.

For each fault it starts a fresh cluster on 127.0.0.1: a ``redis-server``,
node A reaching it through the fault proxy (``guildcast.loadtest.faultproxy``)
and nodes B, C directly (``guildcast serve --redis`` processes). Publishers
on A, B and C publish unique events with ACK; subscribers on every node (they
fall back to the next node when closed) keep every event with the epoch it
was labelled with. After ``--warmup`` seconds the fault is applied for
``--fault-seconds`` (``--pause`` for SIGSTOP), healed, publishing goes on for
``--after`` seconds, then stops. Per fault it prints events acknowledged,
delivered (to every subscriber, summed), lost, doubled, mislabelled
(``guildcast.loadtest.faultcheck``), reloads (SUBSCRIBED ``recovered:
false`` after the first: a subscriber away longer than the history window
is told to reload rather than given a gap), publishes answered "outcome
unknown" or refused, and the time to heal: from the heal until every subscriber had
every event acknowledged before it (or ``>N`` when it had not within
``--settle`` seconds).

Faults: ``delay`` (every chunk late by ``--delay`` s, past
``--redis-timeout``), ``drop`` (A's connections reset), ``stall`` (A's link
pauses), ``blackhole`` (A's packets vanish, nothing closes), ``zombie`` (A's
link forwards only towards Redis), ``zombie-feed`` (the same, on A's pub/sub
connection only), ``redis-restart`` (Redis stopped and started with its AOF),
``redis-restart-empty`` (without persistence), ``sigstop`` (A paused),
``kill9`` (A killed; not restarted).

Bounds: everything on loopback, a fixed set of processes per fault, every
wait bounded; the run stops by itself (exit 0 when every fault lost, doubled
and mislabelled nothing, 1 otherwise, 2 for a usage error).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from guildcast.core.tokens import make_token
from guildcast.loadtest.faultcheck import Ledger, Publisher, Subscriber, Tally, wait_clean
from guildcast.loadtest.faultproxy import ThreadedFaultProxy
from guildcast.loadtest.redisserver import RedisServer, free_port

FAULTS = (
    "delay",
    "drop",
    "stall",
    "blackhole",
    "zombie",
    "zombie-feed",
    "redis-restart",
    "redis-restart-empty",
    "sigstop",
    "kill9",
)
SECRET = "faults-harness-secret-0123456789abcdef"
API_KEY = "faults-harness-api-key"
GUILDS = ["alpha", "beta", "gamma"]
#: Seconds a process may take to start listening.
START_TIMEOUT = 60.0


def _token(user: str) -> str:
    return make_token(SECRET, user, ["*"], ["*"], pub_rate=0)


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen within {START_TIMEOUT:g} s")


class Node:
    """``guildcast serve --redis URL`` on free loopback ports."""

    def __init__(self, redis_url: str, name: str, flags: Sequence[str]) -> None:
        self.redis_url = redis_url
        self.name = name
        self.flags = list(flags)
        self.port = free_port()
        self.api_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "guildcast.cli", "serve", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--api-port", str(self.api_port)]
        cmd += ["--redis", self.redis_url, "--secret", SECRET, "--api-key", API_KEY]
        cmd += ["--node-id", self.name, "--log-level", "ERROR", *self.flags]
        env = {k: v for k, v in os.environ.items() if not k.startswith("GUILDCAST_")}
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_port(self.port, self.proc, f"node {self.name}")

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    async def ready(self, http: aiohttp.ClientSession) -> bool:
        try:
            async with http.get(f"http://127.0.0.1:{self.api_port}/readyz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False


@dataclass
class Row:
    fault: str
    tally: Tally
    unknown: int
    refused: int
    heal: float | None
    settle: float


@contextlib.asynccontextmanager
async def _cluster(
    workdir: Path, persist: bool, flags: Sequence[str]
) -> AsyncIterator[tuple[RedisServer, ThreadedFaultProxy, list[Node]]]:
    redis = RedisServer(workdir, persist)
    redis.start()
    proxy = ThreadedFaultProxy("127.0.0.1", redis.port)
    proxy.start()
    nodes = [Node(proxy.url, "a", flags)]
    nodes += [Node(f"redis://127.0.0.1:{redis.port}/0", n, flags) for n in ("b", "c")]
    try:
        for n in nodes:
            await asyncio.to_thread(n.start)
        yield redis, proxy, nodes
    finally:
        for n in nodes:
            await asyncio.to_thread(n.stop)
        proxy.stop()
        redis.stop()


async def run_fault(fault: str, args: argparse.Namespace, workdir: Path) -> Row:
    flags = ["--redis-timeout", str(args.redis_timeout), "--feed-deadline", str(args.feed_deadline)]
    flags += ["--presence-timeout", str(args.presence_timeout)]
    persist = fault != "redis-restart-empty"
    async with _cluster(workdir, persist, flags) as (redis, proxy, nodes):
        urls = [n.url for n in nodes]
        subs = [
            Subscriber(urls[i % 3 :] + urls[: i % 3], _token(f"s{i}"), GUILDS)
            for i in range(args.subscribers)
        ]
        # Publisher i on node i % 3 (A, B, C, A, ...), staying there.
        pubs = [Publisher([urls[i % 3]], _token(f"p{i}"), f"p{i}") for i in range(args.publishers)]
        ledger = Ledger(pubs, subs)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(s.run()) for s in subs]
        try:
            async with asyncio.timeout(60):
                for s in subs:
                    await s.subscribed.wait()
            ptasks = [asyncio.create_task(p.stream(GUILDS, stop, args.pause_between)) for p in pubs]
            await asyncio.sleep(args.warmup)  # the run's shape: publishing before the fault
            a = nodes[0]
            if fault == "delay":
                proxy.set_mode("delay", args.delay)
            elif fault == "drop":
                proxy.drop()
            elif fault in ("stall", "blackhole", "zombie"):
                proxy.set_mode(fault)
            elif fault == "zombie-feed":
                proxy.set_mode("zombie", only=b"SUBSCRIBE")
            elif fault in ("redis-restart", "redis-restart-empty"):
                await asyncio.to_thread(redis.stop)
            elif fault == "sigstop":
                a.signal(signal.SIGSTOP)
            elif fault == "kill9":
                a.signal(signal.SIGKILL)
            await asyncio.sleep(args.pause if fault == "sigstop" else args.fault_seconds)
            if fault in ("redis-restart", "redis-restart-empty"):
                await asyncio.to_thread(redis.start)
            elif fault == "sigstop":
                a.signal(signal.SIGCONT)
            elif fault != "kill9":
                proxy.heal()
            healed_at = time.monotonic()
            heal_task = asyncio.create_task(wait_clean(ledger, args.settle, until=healed_at))
            await asyncio.sleep(args.after)  # publishing goes on after the heal
            stop.set()
            await asyncio.gather(*ptasks, return_exceptions=True)
            stopped = time.monotonic()
            pre, heal_s = await heal_task
            tally, _ = await wait_clean(ledger, args.settle)
            settle = time.monotonic() - stopped
            return Row(
                fault,
                tally,
                unknown=sum(len(p.unknown) for p in pubs),
                refused=sum(sum(p.refused.values()) for p in pubs),
                heal=heal_s if pre.lost == 0 else None,
                settle=settle,
            )
        finally:
            stop.set()
            for p in pubs:
                await p.close()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def _table(rows: list[Row], settle: float) -> str:
    head = (
        "| fault | acknowledged | delivered | lost | doubled | mislabelled "
        "| reloads | outcome unknown | refused | time to heal |"
    )
    out = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = r.tally
        heal = f"{r.heal:.1f} s" if r.heal is not None else f">{settle:g} s"
        out.append(
            f"| {r.fault} | {t.acknowledged} | {t.delivered} | {t.lost} | {t.doubled} "
            f"| {t.mislabelled} | {t.reloads} | {r.unknown} | {r.refused} | {heal} |"
        )
    return "\n".join(out)


def build_parser(prog: str = "guildcast loadtest faults") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0] if __doc__ else "")
    ap.add_argument("--faults", default=",".join(FAULTS), help="comma-separated (default: all)")
    ap.add_argument("--subscribers", type=int, default=12, help="subscribers over the 3 nodes")
    ap.add_argument("--publishers", type=int, default=3, help="publishers, on A, B, C in turn")
    ap.add_argument("--pause-between", type=float, default=0.01, help="s between publishes")
    ap.add_argument("--warmup", type=float, default=3.0, help="s of publishing before the fault")
    ap.add_argument("--fault-seconds", type=float, default=10.0, help="s each fault lasts")
    ap.add_argument("--pause", type=float, default=30.0, help="s node A stays SIGSTOPped")
    ap.add_argument("--after", type=float, default=5.0, help="s of publishing after the heal")
    ap.add_argument("--settle", type=float, default=60.0, help="longest wait for delivery (s)")
    ap.add_argument("--delay", type=float, default=1.5, help="s the delay fault adds")
    ap.add_argument("--redis-timeout", type=float, default=1.0, help="nodes' --redis-timeout")
    ap.add_argument("--feed-deadline", type=float, default=1.5, help="nodes' --feed-deadline")
    ap.add_argument("--presence-timeout", type=float, default=5.0, help="nodes' presence timeout")
    return ap


async def _run(args: argparse.Namespace, faults: list[str]) -> list[Row]:
    rows = []
    for fault in faults:
        with tempfile.TemporaryDirectory(prefix="guildcast-faults-") as d:
            row = await run_fault(fault, args, Path(d))
        rows.append(row)
        t = row.tally
        print(
            f"faults: {fault}: acked {t.acknowledged}, lost {t.lost}, doubled {t.doubled}, "
            f"mislabelled {t.mislabelled}"
            + (f" ({'; '.join(t.details[:3])})" if t.details else ""),
            file=sys.stderr,
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    bad = [f for f in faults if f not in FAULTS]
    if bad or not faults:
        print(f"faults: unknown fault {bad}; choose from {', '.join(FAULTS)}", file=sys.stderr)
        return 2
    try:
        rows = asyncio.run(_run(args, faults))
    except RuntimeError as e:
        print(f"faults: {e}", file=sys.stderr)
        return 2
    print(_table(rows, args.settle))
    return 0 if all(r.tally.clean for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
