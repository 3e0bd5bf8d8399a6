"""Cluster scaling benchmark: one scenario against 1 and 2 Redis-backed workers.

    python -m guildcast.loadtest.clusterbench [--duration 15] [--scenario S] [-- HARNESS ARGS]

For each worker count it starts its own redis-server (no persistence) on a
free loopback port and ``guildcast serve --redis … --workers W``, runs the
harness against it (``--url``), and measures the CPU of every worker process
and of Redis over the run with psutil. Prints one row per worker count and
the ratio of deliveries per second. Everything it starts is stopped at the
end (also on error). Loopback only; bounded by ``--duration``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

SECRET = "clusterbench-secret-0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            c = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += c.user + c.system
    return total


def run_one(workers: int, scenario: str, duration: int, extra: list[str]) -> dict[str, Any]:
    rport, port = _free_port(), _free_port()
    started: list[subprocess.Popen[bytes]] = []
    try:
        redis = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(rport),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        started.append(redis)
        _wait_port(rport)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GUILDCAST_")}
        sup = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "guildcast.cli",
                "serve",
                "--port",
                str(port),
                "--api-port",
                "-1",
                "--redis",
                f"redis://127.0.0.1:{rport}/0",
                "--workers",
                str(workers),
                "--secret",
                SECRET,
                "--publish-rate",
                "0",
                "--max-connections",
                "19000",
                "--log-level",
                "WARNING",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
        )
        started.append(sup)
        _wait_port(port)
        time.sleep(1.0)  # let every worker bind
        sp = psutil.Process(sup.pid)
        nodes = sp.children() if workers > 1 else [sp]
        rp = psutil.Process(redis.pid)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "result.json"
            c_nodes, c_redis, t0 = _cpu(nodes), _cpu([rp]), time.monotonic()
            rc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "loadtest",
                    scenario,
                    "--url",
                    f"ws://127.0.0.1:{port}/gateway",
                    "--secret",
                    SECRET,
                    "--duration",
                    str(duration),
                    "--json",
                    str(out),
                    "--quiet",
                    *extra,
                ],
                cwd=ROOT,
                check=False,
            ).returncode
            wall = time.monotonic() - t0
            nodes_cpu = (_cpu(nodes) - c_nodes) / wall
            redis_cpu = (_cpu([rp]) - c_redis) / wall
            res = json.loads(out.read_text())
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
    finally:
        for p in reversed(started):
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m guildcast.loadtest.clusterbench", description=__doc__
    )
    ap.add_argument("--duration", type=int, default=15)
    ap.add_argument("--scenario", default="manyguilds")
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more harness options")
    a = ap.parse_args(argv)
    extra = [x for x in a.extra if x != "--"]
    rows = [run_one(w, a.scenario, a.duration, extra) for w in (1, 2)]
    for r in rows:
        print(json.dumps(r))
    if rows[0]["deliveries_per_s"]:
        print(
            f"ratio 2 workers / 1: {rows[1]['deliveries_per_s'] / rows[0]['deliveries_per_s']:.2f}"
        )
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
