"""Cluster scaling benchmark: one scenario against 1 and 2 Redis-backed workers.

    guildcast loadtest clusterbench [--duration 15] [--scenario S] [-- HARNESS ARGS]

For each worker count it starts its own redis-server (no persistence) on a
free loopback port (:class:`~guildcast.loadtest.target.RedisProcess`) and
``guildcast serve --redis … --workers W`` (a
:class:`~guildcast.loadtest.target.ProcessTarget` that waits for every
worker's gateway), runs the harness against it (``--url``, in its own
process), and measures the CPU of every worker process and of Redis over
the run (:class:`~guildcast.loadtest.monitor.ProcSampler`). Prints one row
per worker count and the ratio of deliveries per second. Everything it
starts is stopped at the end (also on error). Loopback only; bounded by
``--duration``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

from guildcast.loadtest.monitor import ProcSampler
from guildcast.loadtest.target import (
    ProcessTarget,
    RedisProcess,
    TargetError,
    die_with_parent,
    free_port,
    stop_process,
)

PROG = "guildcast loadtest clusterbench"
SECRET = "clusterbench-secret-0123456789abcdef"
#: Connections each worker accepts (the harness's 10,000 clients and more).
MAX_CONNECTIONS = 19_000


def cpu_seconds(samplers: list[ProcSampler]) -> float:
    """User + system CPU seconds of the processes still alive."""
    total = 0.0
    for s in samplers:
        x = s.sample(full=False)
        if x is not None:
            total += x["user"] + x["system"]
    return total


def row(
    workers: int, rc: int, res: dict[str, Any], nodes_cpu: float, redis_cpu: float
) -> dict[str, Any]:
    """One printed row from the harness's JSON result and the CPU shares measured."""
    return {
        "workers": workers,
        "exit": rc,
        "ok": res["ok"],
        "deliveries_per_s": res["delivery"]["per_s"],
        "events_per_s": res["publish"]["per_s"],
        "ack_p50_ms": res["publish"]["ack_latency_us"]["p50"] / 1000,
        "nodes_cpu_cores": round(nodes_cpu, 2),
        "redis_cpu_cores": round(redis_cpu, 2),
        "harness_busy_percent": res["harness"]["processes"][0]["busy_percent"],
        "limit": res["limit"],
    }


async def run_one(workers: int, scenario: str, duration: int, extra: list[str]) -> dict[str, Any]:
    redis = RedisProcess()
    flags = {
        "redis": redis.url,
        "workers": workers,
        "publish_rate": 0,
        "max_connections": MAX_CONNECTIONS,
        "log_level": "WARNING",
    }
    server = ProcessTarget("process", port=free_port(), secret=SECRET, flags=flags)
    server.gateways = workers
    try:
        await redis.start()
        await server.start()
        assert server.pid is not None and redis.proc is not None
        sup = psutil.Process(server.pid)
        pids = [p.pid for p in sup.children()] if workers > 1 else [sup.pid]
        nodes = [ProcSampler(pid) for pid in pids]
        rp = [ProcSampler(redis.proc.pid)]
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            argv = [sys.executable, "-P", "-m", "guildcast.loadtest", scenario, "--url", server.url]
            argv += ["--secret", SECRET, "--duration", str(duration), "--json", str(out)]
            argv += ["--quiet", *extra]
            c_nodes, c_redis, t0 = cpu_seconds(nodes), cpu_seconds(rp), time.monotonic()
            harness = await asyncio.create_subprocess_exec(*argv, preexec_fn=die_with_parent)
            try:
                rc = await harness.wait()
            finally:
                await stop_process(harness)
            wall = time.monotonic() - t0
            nodes_cpu = (cpu_seconds(nodes) - c_nodes) / wall
            redis_cpu = (cpu_seconds(rp) - c_redis) / wall
            res = json.loads(out.read_text())
        return row(workers, rc, res, nodes_cpu, redis_cpu)
    finally:
        await server.stop()
        await redis.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """``guildcast loadtest clusterbench``: 0 when both runs' checks held."""
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__)
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument("--scenario", default="manyguilds")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more harness options")
    a = ap.parse_args(argv)
    extra = [x for x in a.extra if x != "--"]
    try:
        rows = [asyncio.run(run_one(w, a.scenario, a.duration, extra)) for w in (1, 2)]
    except TargetError as e:
        print(f"clusterbench: {e}", file=sys.stderr)
        return 2
    for r in rows:
        print(json.dumps(r))
    if rows[0]["deliveries_per_s"]:
        print(
            f"ratio 2 workers / 1: {rows[1]['deliveries_per_s'] / rows[0]['deliveries_per_s']:.2f}"
        )
    return 0 if all(r["ok"] for r in rows) else 1
