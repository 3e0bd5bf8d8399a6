"""``guildcast loadtest`` (and ``python -m guildcast.loadtest``): one harness.

``guildcast loadtest SCENARIO [options]`` runs one scenario (options, then
one :class:`~guildcast.loadtest.runner.Run`); ``guildcast loadtest COMMAND
...`` hands the rest of the command line to a subcommand registered in
:data:`COMMANDS` (each parses its own options).

Exit status of a scenario: 0 when every check holds, 1 when one fails, 2
for a usage or target error (bad option, non-loopback URL, a server that
would not start), 130 on Ctrl-C (after cleaning up). A subcommand's is its
``main``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import shlex
import sys
from collections.abc import Sequence
from typing import Any, Protocol, cast

from guildcast.loadtest.scenarios import COMMON, DEFAULTS, SCENARIOS, default_workers, make_plan


class Command(Protocol):
    """A subcommand module: ``main(argv) -> exit status``."""

    def main(self, argv: Sequence[str] | None = None) -> int: ...


#: Subcommands besides the scenarios: name -> module with ``main(argv) -> int``.
#: Registering one is one line here (modules load only when their command runs).
COMMANDS: dict[str, str] = {
    "soak": "guildcast.loadtest.soak",
    "clusterbench": "guildcast.loadtest.clusterbench",
    "sendcost": "guildcast.loadtest.sendcost",
    "tickcost": "guildcast.loadtest.tickcost",
    "faults": "guildcast.loadtest.faults",
    "wiresize": "guildcast.loadtest.wiresize",
}


def subcommand(name: str) -> Command:
    """The subcommand module registered as ``name``."""
    return cast(Command, importlib.import_module(COMMANDS[name]))


def _kv(s: str) -> tuple[str, Any]:
    k, sep, v = s.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    val: Any = v
    for conv in (int, float):
        try:
            val = conv(v)
            break
        except ValueError:
            pass
    return k.replace("-", "_"), val


def _life(s: str) -> tuple[float, float]:
    a, _, b = s.partition(",")
    return float(a), float(b or a)


def build_parser(prog: str = "python -m guildcast.loadtest") -> argparse.ArgumentParser:
    desc = "Drive a Guildcast server hard and show what it does. Scenarios: " + ", ".join(
        f"{name} ({', '.join(f'{k}={v}' for k, v in d.items())})" for name, d in DEFAULTS.items()
    )
    desc += f". Subcommands (each with its own --help): {', '.join(COMMANDS)}."
    ap = argparse.ArgumentParser(prog=prog, description=desc)
    ap.add_argument("scenario", choices=SCENARIOS)
    g = ap.add_argument_group("load (defaults depend on the scenario; see loadtest/README.md)")
    g.add_argument("--clients", type=int, help="simulated subscribers")
    g.add_argument("--guilds", type=int, help="guilds; client i joins guild i %% G")
    g.add_argument(
        "--duration", type=float, help=f"seconds of publishing (default {COMMON['duration']})"
    )
    g.add_argument(
        "--rate", type=float, help="events/s over all publishers (0: as fast as ACKs allow)"
    )
    g.add_argument("--inflight", type=int, help="unacknowledged events per publisher (8 at rate 0)")
    g.add_argument("--size", type=int, help=f"bytes of each event's d (default {COMMON['size']})")
    g.add_argument("--publishers", type=int, help="publisher connections (default 1)")
    g.add_argument(
        "--via", choices=("gateway", "http"), help="publish with op 5 or POST /v1/publish"
    )
    g.add_argument(
        "--workers",
        type=int,
        help="client worker processes (1: in this process; default the scenario's, "
        "at least one per --client-cpus CPU, each pinned to its own)",
    )
    fleet = g.add_mutually_exclusive_group()
    fleet.add_argument(
        "--spawn",
        action="store_const",
        const=True,
        dest="spawn",
        help="run even a single subscriber fleet in its own process (the default unless "
        "--server embedded): the publishers' loop then sends each event as its ACK "
        "window opens, as the referee's publisher does",
    )
    fleet.add_argument(
        "--inline",
        action="store_const",
        const=False,
        dest="spawn",
        help="run a single subscriber fleet (--workers 1) in the harness's own process, "
        "beside the publishers (the default with --server embedded); the server then "
        "gets events in bursts between the fleet's reads, cheaper per delivery than "
        "the referee's pattern",
    )
    g.add_argument(
        "--max-lag",
        type=int,
        help="flow control: events publishers may be ahead of subscribers (0: off; default "
        "at rate 0 the larger of inflight x publishers and the events that leave each "
        "subscriber 16 KiB behind, off at a fixed rate)",
    )
    g.add_argument(
        "--lat-sample", type=float, help="fraction of clients recording latency (default 1)"
    )
    g.add_argument("--slow-fraction", type=float, help="slowconsumers: fraction that stops reading")
    g.add_argument(
        "--slow-rcvbuf", type=int, help="SO_RCVBUF of slow consumers (0: kernel default)"
    )
    g.add_argument("--churn-fraction", type=float, help="churn: fraction that comes and goes")
    g.add_argument("--churn-life", type=_life, help="churn: seconds subscribed, 'MIN,MAX'")
    g.add_argument(
        "--reconnect-at", type=float, help="reconnect: when, as a fraction of --duration"
    )
    g.add_argument(
        "--reconnect-mode",
        choices=("auto", "disconnect", "restart", "kill", "rolling", "kill-worker", "client"),
        help="reconnect, storm: drop sessions with srv.disconnect_all(4000) (embedded), a server "
        "restart (process, with --data-dir: SIGTERM, or kill -9), a rolling restart or one "
        "worker killed (storm on --workers 2 over Redis), or client-side aborts; auto picks "
        "the first",
    )
    g.add_argument("--source-addrs", type=int, help="spread connections over 127.0.0.1..N (16)")
    g.add_argument("--connect-concurrency", type=int, help="connections opening at once (256)")
    g.add_argument("--connect-timeout", type=float, help="seconds for every client to connect")
    g.add_argument("--drain-timeout", type=float, help="seconds for every delivery to arrive")
    g.add_argument("--seed", type=int, help="seed of every random choice (1)")
    g.add_argument(
        "--deflate",
        action="store_true",
        default=None,
        help="subscribers offer permessage-deflate and inflate compressed events",
    )
    g.add_argument(
        "--pad",
        choices=("x", "text"),
        help="event padding: x (repeated, compresses to nothing) or text (like chat) (x)",
    )
    g.add_argument("--per-client", type=int, help="guilds per client (passive: 20)")
    g.add_argument(
        "--active",
        type=int,
        help="passive: guilds each client subscribes actively (1; the rest passive)",
    )
    g.add_argument(
        "--activity-batch",
        action="store_true",
        default=None,
        help="passive: clients ask for a tick's notices in one GUILD_ACTIVITY (IDENTIFY "
        "activity_batch, protocol 1.1)",
    )
    g.add_argument(
        "--publish-tick",
        type=float,
        help="fixed rate: seconds between a publisher's writes, the events due meanwhile "
        "pipelined in one write (0: each event on its own as it falls due)",
    )
    s = ap.add_argument_group("server")
    s.add_argument(
        "--server",
        choices=("embedded", "process"),
        help="start one: in this process, or `guildcast serve` pinned to "
        "--server-cpus (default: process, unless --url is given)",
    )
    s.add_argument("--server-cpus", help="CPUs of the server process, e.g. 0 or 0-1")
    s.add_argument("--client-cpus", help="CPUs of the harness, e.g. 1")
    s.add_argument(
        "--server-log",
        help="--server process: append what it prints (every start) to this file; "
        "GUILDCAST_LOG_LEVEL=INFO for its INFO lines (e.g. `node stopped`)",
    )
    s.add_argument("--max-buffer", type=int, help="server max_buffer (slowconsumers: 1 MiB)")
    s.add_argument("--history-size", type=int, help="server history_size")
    s.add_argument(
        "--server-opt",
        type=_kv,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other server setting (a `guildcast serve` flag by its Config name), repeatable",
    )
    s.add_argument("--url", help="gateway of a running server (loopback only)")
    s.add_argument("--api-url", help="HTTP API of a running server, for --via http")
    s.add_argument("--secret", help="the running server's token secret (tokens are minted)")
    s.add_argument("--token", help="a token for a running server (subscribe to * and publish)")
    s.add_argument("--api-key", help="API key for --via http")
    s.add_argument("--server-pid", type=int, help="pid of a running server, to measure it")
    o = ap.add_argument_group("output")
    o.add_argument("--json", metavar="PATH", help="write the full result as JSON ('-': stdout)")
    o.add_argument("--plot", metavar="PATH", help="draw latency percentiles and throughput (PNG)")
    o.add_argument("--quiet", action="store_true", help="no progress, no summary")
    return ap


PLAN_KEYS = (
    "clients",
    "guilds",
    "duration",
    "rate",
    "inflight",
    "size",
    "publishers",
    "workers",
    "via",
    "lat_sample",
    "max_lag",
    "slow_fraction",
    "slow_rcvbuf",
    "churn_fraction",
    "churn_life",
    "reconnect_at",
    "reconnect_mode",
    "source_addrs",
    "connect_concurrency",
    "connect_timeout",
    "drain_timeout",
    "seed",
    "max_buffer",
    "history_size",
    "deflate",
    "pad",
    "per_client",
    "active",
    "publish_tick",
    "activity_batch",
)


def main(argv: Sequence[str] | None = None, prog: str = "python -m guildcast.loadtest") -> int:
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if argv_list[:1] and argv_list[0] in COMMANDS:
        return subcommand(argv_list[0]).main(argv_list[1:])
    from guildcast.loadtest import report
    from guildcast.loadtest.runner import Run, TargetOptions
    from guildcast.loadtest.target import TargetError, loopback_host, parse_cpus

    args = build_parser(prog).parse_args(argv_list)
    command = f"{prog} {shlex.join(argv_list)}"
    try:
        given = {k: getattr(args, k) for k in PLAN_KEYS}
        plan = make_plan(args.scenario, given)
        client_cpus = parse_cpus(args.client_cpus)
        workers = default_workers(args.workers, plan.workers, client_cpus)
        if workers != plan.workers:
            plan = make_plan(args.scenario, {**given, "workers": workers})
    except ValueError as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return 2
    server = args.server or ("external" if args.url else "process")
    if args.url and args.server:
        print("loadtest: give either --url or --server, not both", file=sys.stderr)
        return 2
    topts = TargetOptions(
        server=server,
        url=args.url,
        api_url=args.api_url,
        secret=args.secret,
        token=args.token,
        api_key=args.api_key,
        server_pid=args.server_pid,
        server_cpus=parse_cpus(args.server_cpus),
        client_cpus=client_cpus,
        server_opts=dict(args.server_opt),
        spawn=args.spawn,
        server_log=args.server_log,
    )
    try:
        for url, what in ((args.url, "--url"), (args.api_url, "--api-url")):
            if url:
                loopback_host(url, what)
    except TargetError as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return 2
    progress = report.Progress(plan.scenario, args.quiet)
    run = Run(plan, topts, progress, command)
    try:
        import uvloop

        result = uvloop.run(run.execute())
    except TargetError as e:
        progress.close()
        print(f"loadtest: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        progress.close()
        print("loadtest: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    if args.json:
        report.write_json(result, args.json)
    if args.plot:
        report.plot(result, args.plot)
    if not args.quiet:
        report.summary(result)
        for note in result["notes"]:
            print(f"note: {note}")
    return 0 if result["ok"] else 1
