"""``guildcast serve --workers N``: N nodes on one machine, one port.

A small supervisor in the manner of an Erlang ``one_for_one`` supervisor:
it starts N worker processes (``python -m guildcast.cli serve …``) that share
the gateway port with SO_REUSEPORT (the kernel spreads connections over
them), restarts a worker that dies (at most ``MAX_RESTARTS`` in
``RESTART_WINDOW`` seconds, else it gives up and stops everything), and on
SIGTERM/SIGINT forwards SIGTERM so every worker drains gracefully.

Workers die with their supervisor, even when it is killed with SIGKILL and
can forward nothing: each worker arms the parent-death signal (Linux
``PR_SET_PDEATHSIG``: SIGTERM, a graceful drain) and also watches its parent
pid (``guildcast.cli._die_with_supervisor``), so no orphan keeps serving the
port with a retired secret.

Workers share state only through Redis, so ``--workers`` > 1 needs
``--redis``; they also need one secret and one API key, which the caller
(``guildcast.cli``: given, generated or kept in the state file) hands to
every worker, with the lines to print about them (``notes``).
Each worker also listens on its own API port (``--node-api-port``, worker
``i`` on ``PORT+i``, default a free port each) and labels every metric with
``node``: the shared API port answers from a random worker, so Prometheus
scrapes each worker's own port (docs/OPERATIONS.md "Metrics").
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import Any

#: Restart intensity: more worker deaths than this in the window means
#: something is structurally wrong; stop instead of flapping.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
#: Flags the supervisor sets per worker itself; dropped from the child argv.
_OWN_FLAGS = ("--workers", "--node-api-port", "--secret", "--api-key")


def _child_argv(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in _OWN_FLAGS:
            skip = True
            continue
        if a.startswith(tuple(f + "=" for f in _OWN_FLAGS)):
            continue
        out.append(a)
    return out


def run_workers(
    n: int,
    args: argparse.Namespace,
    argv: list[str],
    *,
    secret: str | None,
    api_keys: tuple[str, ...],
    notes: list[str],
    print_token: bool,
) -> int:
    """Run ``n`` workers until a signal; returns the exit status."""
    if not args.redis:
        print(
            "guildcast serve: --workers > 1 needs --redis: workers share guilds only "
            "through Redis (see README, 'Cluster')",
            file=sys.stderr,
        )
        return 2
    if args.port == 0:
        print("guildcast serve: --workers needs a fixed --port to share", file=sys.stderr)
        return 2
    assert secret, "guildcast.cli gives every worker one secret"
    env = dict(os.environ)
    env.update(
        GUILDCAST_SECRET=secret,
        GUILDCAST_WORKERS="1",
        GUILDCAST_REUSE_PORT="1",
        GUILDCAST_SUPERVISOR_PID=str(os.getpid()),
    )
    if api_keys:
        env["GUILDCAST_API_KEYS"] = ",".join(api_keys)
    # -P: nothing in the current directory (a user's own server.py) can shadow the package.
    cmd = [sys.executable, "-P", "-m", "guildcast.cli", *_child_argv(argv)]
    for line in notes:
        print(line, flush=True)
    if print_token:
        from guildcast.cli import _demo_lines

        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"guildcast: secret: {secret}", flush=True)
        for line in _demo_lines(secret, f"ws://{host}:{args.port}/gateway"):
            print(line, flush=True)

    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def spawn(i: int) -> subprocess.Popen[bytes]:
        node_port = 0 if args.node_api_port is None else args.node_api_port + i
        return subprocess.Popen(
            cmd,
            env={
                **env,
                "GUILDCAST_WORKER_INDEX": str(i),
                "GUILDCAST_NODE_API_PORT": str(node_port),
            },
        )

    procs = [spawn(i) for i in range(n)]
    print(f"guildcast: supervising {n} workers: {[p.pid for p in procs]}", flush=True)
    deaths: list[float] = []
    status = 0
    while not stopping:
        time.sleep(0.2)
        for i, p in enumerate(procs):
            if p.poll() is None or stopping:
                continue
            now = time.monotonic()
            deaths = [t for t in deaths if now - t < RESTART_WINDOW] + [now]
            if len(deaths) > MAX_RESTARTS:
                print("guildcast: workers keep dying; stopping", file=sys.stderr, flush=True)
                stopping = True
                status = 1
                break
            print(f"guildcast: worker {i} exited with {p.returncode}; restarting", flush=True)
            procs[i] = spawn(i)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + float(args.drain_timeout) + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return status
