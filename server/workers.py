"""``guildcast serve --workers N``: N nodes on one machine, one port.

A small supervisor in the manner of an Erlang ``one_for_one`` supervisor:
it starts N worker processes (``python -m guildcast.cli serve …``) that share
the gateway port with SO_REUSEPORT (the kernel spreads connections over
them), restarts a worker that dies (at most ``MAX_RESTARTS`` in
``RESTART_WINDOW`` seconds, else it gives up and stops everything), and on
SIGTERM/SIGINT forwards SIGTERM so every worker drains gracefully.

Workers share state only through Redis, so ``--workers`` > 1 needs
``--redis``; they also need one secret, which the supervisor generates if
none was given and hands to every worker.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from typing import Any

#: Restart intensity: more worker deaths than this in the window means
#: something is structurally wrong; stop instead of flapping.
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0


def _child_argv(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--workers":
            skip = True
            continue
        if a.startswith("--workers="):
            continue
        out.append(a)
    return out


def run_workers(n: int, args: argparse.Namespace, argv: list[str]) -> int:
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
    secret = args.secret or os.environ.get("GUILDCAST_SECRET")
    generated = secret is None
    if secret is None:
        secret = secrets.token_urlsafe(32)
    env = dict(os.environ)
    env.update(GUILDCAST_SECRET=secret, GUILDCAST_WORKERS="1", GUILDCAST_REUSE_PORT="1")
    # -P: nothing in the current directory (a user's own server.py) can shadow the package.
    cmd = [sys.executable, "-P", "-m", "guildcast.cli", *_child_argv(argv)]
    if generated:
        from guildcast.core.tokens import make_token

        print(f"guildcast: generated secret for this run: {secret}", flush=True)
        tok = make_token(secret, "demo", ["*"], ["*"], None, 24 * 3600)
        print(f"guildcast: a token for user 'demo' (all guilds, 24 h): {tok}", flush=True)

    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def spawn(i: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(cmd, env={**env, "GUILDCAST_WORKER_INDEX": str(i)})

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
