"""``guildcast`` command line: ``serve`` and ``token``.

Every ``serve`` flag may also come from an environment variable named
``GUILDCAST_`` plus the flag in upper case with ``-`` as ``_`` (for example
``--history-size`` and ``GUILDCAST_HISTORY_SIZE``). A flag wins over the
environment. API keys: ``--api-key KEY`` (repeatable) or
``GUILDCAST_API_KEYS=k1,k2``; earlier token secrets still accepted during a
rotation: ``--previous-secret S`` (repeatable) or
``GUILDCAST_PREVIOUS_SECRETS=s1,s2``.

``serve`` prints one line per listener, for people and for scripts that
start it with port 0::

    guildcast: gateway on ws://127.0.0.1:PORT/gateway
    guildcast: api on http://127.0.0.1:PORT
    guildcast: node NODE own API at http://127.0.0.1:PORT   (--node-api-port, --workers)

Without ``--secret`` (the embedded default) ``serve`` generates a secret, and
without ``--api-key`` an API key, once and keeps them in a state file
(``guildcast.state``: mode 0600, its path printed), so a restart accepts the
same tokens; ``token`` signs with that same secret when given none. With a
``--secret`` of one's own and no key, a key is generated for that run only.
Mistakes an operator makes (an empty secret, a port in use,
a bad environment variable, a bad ``--redis`` URL) end with one line on
stderr and a non-zero status (2 for usage, 1 for the rest), not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from guildcast.config import COMPRESSION_MODES, Config
from guildcast.core import gcpolicy

if TYPE_CHECKING:
    from guildcast.node import Server

log = logging.getLogger("guildcast")

#: Config fields exposed as ``serve`` flags, with their help text.
_SERVE_FLAGS: dict[str, str] = {
    "host": "gateway listen address",
    "port": "gateway port (0: any free port)",
    "secret": "HS256 token secret (default: generated once, kept in the state file)",
    "heartbeat_interval_ms": "heartbeat interval announced in HELLO",
    "history_size": "events kept per guild for recovery",
    "history_ttl": "seconds an event stays in history",
    "max_rewind": "most events a rewind replays to a fresh subscriber (0: rewinds off)",
    "partition_size": "sessions per partition actor",
    "max_buffer": "unsent bytes per connection before close 4010",
    "compression": "permessage-deflate: on (compress each message once for every client "
    "that negotiates it) or off",
    "compression_threshold": "payload bytes from which a message is compressed",
    "max_frame": "largest incoming message in bytes (1009 past it)",
    "max_payload": "largest PUBLISH in bytes (ERROR 4413 past it)",
    "publish_rate": "default PUBLISH events/s per connection (0: unlimited)",
    "max_connections": "connections before close 1013",
    "max_subscriptions": "guilds per session",
    "max_pending_publishes": "PUBLISHes awaiting an answer per session (close 4008 past it)",
    "max_guilds": "guild actors alive at once",
    "idle_timeout": "seconds before an unused guild actor stops",
    "passive_interval": "seconds between two activity notices of a guild to its passive "
    "subscribers",
    "drain_timeout": "seconds a graceful shutdown waits for clients",
    "drain_spread": "seconds a graceful shutdown spreads its RECONNECTs over, at most "
    "(default: 5 with --redis or --workers, else 0)",
    "admit_rate": "IDENTIFYs admitted per second, resumes first (0: no bound; close 1013 "
    "with a retry hint past it)",
    "listen_sockets": "listening sockets of the gateway's port on Linux, each its own accept "
    "queue (SO_REUSEPORT): room for a reconnect storm",
    "redis": "redis://HOST:PORT/DB: run as a cluster node over this Redis",
    "node_id": "this node's name in presence and metrics (default host:pid with --redis, "
    "else 'local')",
    "node_api_port": "this node's own API port, never shared (with --workers N: worker i "
    "listens on PORT+i, default free ports, printed)",
    "api_max_body": "largest HTTP API request body in bytes (413 past it)",
    "api_max_batch": "events per HTTP batch publish (400 past it)",
    "api_publish_rate": "HTTP publish events/s per API key (0: unlimited; 429 past it)",
    "api_body_timeout": "seconds an HTTP request body may take to arrive (408 past it)",
    "api_idle_timeout": "seconds an HTTP connection may stay without a complete request",
    "handshake_timeout": "seconds to complete the WebSocket upgrade after connecting",
    "identify_timeout": "seconds to send IDENTIFY after HELLO (close 4003 past it)",
    "data_dir": "directory for durable guild history (default: memory only)",
    "fsync": "journal fsync policy: always, interval or never",
    "fsync_interval": "seconds between journal fsyncs with --fsync interval",
    "presence_timeout": "seconds before a silent node's sessions leave presence",
    "presence_limit": "members a PRESENCE_SNAPSHOT lists (past it: the count, truncated)",
    # --- Hardening limits (docs/SECURITY.md "Resource limits") ---
    "history_guild_bytes": "bytes of history one guild keeps in memory (oldest leave first)",
    "history_node_bytes": "bytes of history all guilds keep in memory (oldest leave first)",
    "user_publish_bytes": "PUBLISH bytes/s per user over all connections (0: unlimited)",
    "user_guild_share": "share of --max-guilds one user's subscriptions may start",
    "idempotency_ttl": "seconds a publish's idempotency key is remembered (0: off)",
    "idempotency_guild_keys": "idempotency keys remembered per guild (oldest leave first)",
    "idempotency_node_keys": "idempotency keys remembered per node, single node brokers",
    # --- Cluster (docs/OPERATIONS.md "Cluster: Redis requirements and faults") ---
    "redis_timeout": "seconds a Redis command may take before it counts as failed",
    "feed_deadline": "seconds the Redis pub/sub feed may stay silent before it is resubscribed",
}


#: ``guildcast serve``'s API port; an embedded ``Config`` runs no API by default.
DEFAULT_API_PORT = 8081


def _env_list(name: str) -> list[str]:
    """A comma-separated environment variable as a list, blanks dropped."""
    return [v for v in (part.strip() for part in os.environ.get(name, "").split(",")) if v]


class BadEnv:
    """The default of a flag whose environment variable does not parse: the
    error is reported by the command that uses the flag (``serve``), so a bad
    ``serve`` variable never breaks ``token``."""

    def __init__(self, var: str, raw: str, kind: str) -> None:
        self.message = f"{var}={raw!r} is not {kind}"

    def __repr__(self) -> str:
        return "(bad environment variable)"


_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True}
_BOOL_WORDS |= {"0": False, "false": False, "no": False, "off": False, "": False}


def _env_default(name: str, default: Any, conv: Any = None) -> Any:
    var = "GUILDCAST_" + name.upper()
    raw = os.environ.get(var)
    if raw is None:
        return default
    if isinstance(default, bool):
        if raw.strip().lower() not in _BOOL_WORDS:
            return BadEnv(var, raw, "a boolean (1/0, true/false, yes/no, on/off)")
        return _BOOL_WORDS[raw.strip().lower()]
    conv = conv or (type(default) if isinstance(default, int | float) else None)
    if conv is None or conv is str:
        return raw
    try:
        return conv(raw)
    except ValueError:
        return BadEnv(var, raw, "an integer" if conv is int else "a number")


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="run a Guildcast node")
    defaults = Config()
    types = {f.name: f.type for f in fields(Config)}
    for name, help_text in _SERVE_FLAGS.items():
        default = getattr(defaults, name)
        conv: Any = str
        if "int" in str(types[name]) and not isinstance(default, float):
            conv = int
        elif "float" in str(types[name]):
            conv = float
        p.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            type=conv,
            default=_env_default(name, default, conv),
            help=f"{help_text} (default {default!r}; env GUILDCAST_{name.upper()})",
        )
    p.add_argument(
        "--workers",
        type=int,
        default=_env_default("workers", 1),
        help="run N nodes sharing the port (SO_REUSEPORT); needs --redis (env GUILDCAST_WORKERS)",
    )
    p.add_argument(
        "--api-port",
        type=int,
        default=_env_default("api_port", DEFAULT_API_PORT),
        help=f"HTTP API port (0: any free port; -1: no API; default {DEFAULT_API_PORT}; "
        "env GUILDCAST_API_PORT)",
    )
    p.add_argument(
        "--api-key",
        dest="api_keys",
        action="append",
        default=None,
        help="an HTTP API key (repeat for more; default: env GUILDCAST_API_KEYS, "
        "comma-separated, else one generated and printed)",
    )
    p.set_defaults(env_api_keys=_env_list("GUILDCAST_API_KEYS"))
    p.add_argument(
        "--previous-secret",
        dest="previous_secrets",
        action="append",
        default=None,
        help="an earlier token secret still accepted, never used to sign (repeat for more; "
        "default: env GUILDCAST_PREVIOUS_SECRETS, comma-separated)",
    )
    p.set_defaults(env_previous_secrets=_env_list("GUILDCAST_PREVIOUS_SECRETS"))
    p.add_argument(
        "--metrics-open",
        action="store_true",
        default=_env_default("metrics_open", False),
        help="serve /metrics without an API key (env GUILDCAST_METRICS_OPEN)",
    )
    p.add_argument(
        "--no-demo",
        action="store_true",
        default=_env_default("no_demo", False),
        help="do not serve the demo board at / on the gateway port (env GUILDCAST_NO_DEMO)",
    )
    p.add_argument(
        "--state-file",
        default=os.environ.get("GUILDCAST_STATE_FILE"),
        help="where a generated secret and API key are kept across restarts (default: "
        "DATA_DIR/guildcast-state.json with --data-dir, else "
        "$XDG_STATE_HOME/guildcast/state.json; env GUILDCAST_STATE_FILE)",
    )
    p.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio loop")
    p.add_argument("--log-level", default=os.environ.get("GUILDCAST_LOG_LEVEL", "INFO"))
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get("GUILDCAST_LOG_FORMAT", "text"),
        help="text, or json: one JSON object per line (env GUILDCAST_LOG_FORMAT)",
    )


def _token_parser(sub: Any) -> None:
    p = sub.add_parser("token", help="print a signed token")
    p.add_argument(
        "--secret",
        default=os.environ.get("GUILDCAST_SECRET"),
        help="the server's HS256 secret (default: env GUILDCAST_SECRET, else the one "
        "'guildcast serve' generated and keeps in its state file)",
    )
    p.add_argument(
        "--state-file",
        default=os.environ.get("GUILDCAST_STATE_FILE"),
        help="the state file to read the secret from (default: serve's; see serve --help)",
    )
    p.add_argument(
        "--data-dir",
        default=os.environ.get("GUILDCAST_DATA_DIR"),
        help="serve's --data-dir, where its state file is (env GUILDCAST_DATA_DIR)",
    )
    p.add_argument("--sub", required=True, help="the user")
    p.add_argument(
        "--guilds",
        action="append",
        required=True,
        help="guilds the token may subscribe to: an id or a pattern like 'team-*' "
        "or '*' for all (repeat for more; required: a grant is always explicit)",
    )
    p.add_argument(
        "--pub",
        action="append",
        default=None,
        help="guilds the token may publish to, same patterns (repeat; default: none)",
    )
    p.add_argument(
        "--pub-rate",
        type=float,
        default=None,
        help="PUBLISH events/s for this token (0: unlimited; default: the server's --publish-rate)",
    )
    p.add_argument("--ttl", type=float, default=3600, help="seconds until expiry (0: never)")


class _Version(argparse.Action):
    """``--version``, the version read only when asked for: reading it
    (``importlib.metadata``) cost 0.05-0.1 s of every ``serve`` start."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> NoReturn:
        from guildcast import __version__

        print(f"guildcast {__version__}", flush=True)  # stdout, as argparse's own
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guildcast", description="Guildcast fanout server")
    parser.add_argument("--version", action=_Version, help="show the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _token_parser(sub)
    # Listed for --help only: main() hands everything after it to loadtest's own parser.
    sub.add_parser("loadtest", help="load-test a server (options: guildcast loadtest --help)")
    return parser


def _demo_lines(secret: str, gateway_url: str) -> list[str]:
    """The demo token and board link ``serve`` prints with a generated secret."""
    from guildcast.core.tokens import make_token

    tok = make_token(secret, "demo", ["*"], ["*"], None, DEMO_TOKEN_TTL)
    page = gateway_url.replace("ws://", "http://", 1).removesuffix("/gateway")
    return [
        f"guildcast: a token for user 'demo' (all guilds, 24 h): {tok}",
        f"guildcast: live demo board: {page}/#token={tok}&guild=demo",
    ]


#: Seconds the printed demo token lasts: a day of trying things out.
DEMO_TOKEN_TTL = 24 * 3600
#: Seconds between a worker's checks that its supervisor still lives (the
#: fallback where no parent-death signal exists).
PARENT_CHECK_INTERVAL = 1.0


def _die_with_supervisor(
    stop: Callable[[], None], tg: asyncio.TaskGroup
) -> asyncio.Task[None] | None:
    """In a ``--workers`` worker: stop when the supervisor dies, even by
    SIGKILL (it cannot forward anything then). The kernel sends SIGTERM on
    the parent's death (Linux ``PR_SET_PDEATHSIG``: a graceful drain); a
    watcher task in ``tg`` also polls the parent pid, for other systems and
    for a parent that died before the signal was armed. Returns the watcher
    (its owner cancels it when the node has stopped)."""
    raw = os.environ.get("GUILDCAST_SUPERVISOR_PID")
    if not raw:
        return None
    supervisor = int(raw)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the watcher below still covers it

    async def watch() -> None:
        while os.getppid() == supervisor:  # noqa: ASYNC110 - a pid has no event to wait on
            await asyncio.sleep(PARENT_CHECK_INTERVAL)
        log.warning("the --workers supervisor is gone; stopping")
        stop()

    return tg.create_task(watch(), name="supervisor-watch")


async def _serve(cfg: Config, notes: list[str], print_token: bool) -> int:
    """Run a node until SIGTERM/SIGINT (or the supervisor's death). Its one
    extra task, the supervisor watcher, is owned by a TaskGroup; a signal
    that comes while the node is still starting (waiting for Redis may take
    long) cancels ``Server.start``, which unwinds what it started."""
    import time

    imported = time.monotonic()
    from guildcast import node

    imported = time.monotonic() - imported
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    stop = asyncio.Event()
    starting = True

    def on_stop() -> None:
        stop.set()
        if starting and main is not None:
            main.cancel()  # interrupts Server.start (below), nothing later

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    srv = node.Server(cfg)
    async with asyncio.TaskGroup() as tg:
        watcher = _die_with_supervisor(on_stop, tg)
        try:
            try:
                status = await _start(srv)
            except asyncio.CancelledError:
                if not stop.is_set() or main is None:
                    raise
                main.uncancel()  # our own cancel, from on_stop
                print("guildcast: stopped before starting", flush=True)
                return 0
            finally:
                starting = False
            if status is not None:
                return status
            log.info(
                "node started",
                extra={"start_seconds": _process_age(), "node_import_seconds": round(imported, 3)},
            )
            await _run(srv, stop, notes, print_token)
        finally:
            if watcher is not None:
                watcher.cancel()
    print("guildcast: stopped", flush=True)
    return 0


def _process_age() -> float | None:
    """Seconds since this process was started (its exec included: the
    interpreter's start and every import), from ``/proc/self/stat``; None
    where there is none. For the ``node started`` INFO line: a restart's
    start is timed from its exec, not from the first line of our code."""
    import time

    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    # Field 22 (starttime, clock ticks since boot); fields[0] is field 3.
    return round(time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / ticks, 3)


async def _start(srv: Server) -> int | None:
    """Start ``srv``; the exit status of a start that failed, else None."""
    from guildcast.broker.base import BrokerUnavailable

    try:
        await srv.start()
    except OSError as e:
        listening = e.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES)
        return _fail(f"cannot listen: {e}" if listening else str(e), 1)
    except ValueError as e:
        return _fail(str(e), 2)
    except BrokerUnavailable as e:  # a data dir that cannot be used
        return _fail(str(e), 1)
    gcpolicy.tune()  # the node's structures exist now: frozen, never walked again
    return None


async def _run(srv: Server, stop: asyncio.Event, notes: list[str], print_token: bool) -> None:
    """Say where the node listens, wait for the stop signal, stop it."""
    try:
        print(f"guildcast: gateway on {srv.url}", flush=True)
        if srv.api is not None:
            print(f"guildcast: api on {srv.api_url}", flush=True)
        if srv.node_api_port:
            print(
                f"guildcast: node {srv.node_id} own API at "
                f"{srv.api_url.rsplit(':', 1)[0]}:{srv.node_api_port}",
                flush=True,
            )
        for line in notes:
            print(line, flush=True)
        if print_token:
            print(f"guildcast: secret: {srv.secret}", flush=True)
            for line in _demo_lines(srv.secret, srv.url):
                print(line, flush=True)
        await stop.wait()
        print("guildcast: draining", flush=True)
    finally:
        await srv.stop()


def _fail(message: str, status: int = 2) -> int:
    """One line on stderr for the operator; returns the exit status."""
    print(f"guildcast serve: {message}", file=sys.stderr, flush=True)
    return status


def _check_redis_url(url: str) -> str | None:
    """Why ``url`` is not a Redis URL we can use, or None."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        _ = parts.port  # raises for a port that is not a number
    except ValueError as e:
        return f"--redis {url!r} is not a URL: {e}"
    if parts.scheme not in ("redis", "rediss", "unix"):
        return f"--redis {url!r}: the URL must start with redis://, rediss:// or unix://"
    if parts.scheme != "unix" and not parts.hostname:
        return f"--redis {url!r}: no host (redis://HOST:PORT/DB)"
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        return f"--redis {url!r}: the database must be a number (redis://HOST:PORT/DB)"
    return None


def _token(args: argparse.Namespace) -> int:
    from guildcast import state
    from guildcast.core.tokens import make_token

    secret = args.secret
    if secret is None:
        path = args.state_file or state.default_path(args.data_dir)
        try:
            secret = state.read(Path(path)).get("secret")
        except state.StateError as e:
            print(f"guildcast token: {e}", file=sys.stderr)
            return 2
    if not secret:
        print(
            "guildcast token: give --secret or set GUILDCAST_SECRET (not empty); "
            "with neither, the secret 'guildcast serve' keeps in its state file is used, "
            "and there is none yet",
            file=sys.stderr,
        )
        return 2
    print(
        make_token(secret, args.sub, args.guilds, args.pub or [], args.pub_rate, args.ttl or None)
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    rest = list(sys.argv[1:] if argv is None else argv)
    if rest[:1] == ["loadtest"]:
        try:  # lazy: the server never needs the harness's extra dependencies
            from guildcast.loadtest.cli import main as loadtest_main
        except ImportError as exc:
            print(
                f"guildcast loadtest: {exc.name or exc} is missing; "
                "install the harness with: pip install 'guildcast[loadtest]'",
                file=sys.stderr,
            )
            return 2
        return loadtest_main(rest[1:], prog="guildcast loadtest")
    args = build_parser().parse_args(argv)
    if args.command == "token":
        return _token(args)
    from guildcast import logs, state
    from guildcast.core.journal import FSYNC_POLICIES

    for value in vars(args).values():
        if isinstance(value, BadEnv):
            return _fail(value.message)
    try:
        logs.setup(args.log_level, args.log_format)
    except ValueError as e:
        return _fail(str(e))
    if args.fsync not in FSYNC_POLICIES:
        return _fail(f"--fsync must be one of {FSYNC_POLICIES}")
    if args.compression not in COMPRESSION_MODES:
        return _fail(f"--compression must be one of {COMPRESSION_MODES}")
    if not args.passive_interval > 0:
        return _fail("--passive-interval must be > 0 seconds")
    if args.listen_sockets < 1:
        return _fail("--listen-sockets must be 1 or more")
    if args.max_rewind < 0:
        return _fail("--max-rewind must be 0 (rewinds off) or more")
    if args.secret == "":
        return _fail("the secret is empty (--secret or GUILDCAST_SECRET): give one, or unset it")
    if "GUILDCAST_API_KEYS" in os.environ and not args.env_api_keys and not args.api_keys:
        return _fail("GUILDCAST_API_KEYS is set but empty: give a key, or unset it")
    if any(not k for k in args.api_keys or ()):
        return _fail("an --api-key is empty")
    if any(not k for k in args.previous_secrets or ()):
        return _fail("a --previous-secret is empty")
    if args.redis and args.data_dir:
        return _fail("--redis and --data-dir exclude each other: Redis holds the history")
    if args.redis and (why := _check_redis_url(args.redis)):
        return _fail(why)
    api_keys = tuple(args.api_keys or args.env_api_keys)
    secret: str | None = args.secret
    worker = bool(os.environ.get("GUILDCAST_WORKER_INDEX"))
    #: Lines printed once listening (the supervisor prints them for its workers).
    notes: list[str] = []
    needs_key = not api_keys and args.api_port >= 0
    print_token = not worker and secret is None
    if print_token:
        # The embedded default: the generated secret (and key) outlive a restart.
        path = Path(args.state_file) if args.state_file else state.default_path(args.data_dir)
        try:
            kept = state.load_or_create(path)
        except state.StateError as e:
            return _fail(f"{e} (give --secret and --api-key, or --state-file PATH)")
        notes.append(f"guildcast: generated secret and API key kept in {kept.path}")
        secret = kept.secret
        if needs_key:
            api_keys = (kept.api_key,)
            notes.append(f"guildcast: API key: {kept.api_key}")
    elif not worker and needs_key:
        # A secret of one's own but no key: one for this run, as it says.
        import secrets

        api_keys = (secrets.token_urlsafe(state.API_KEY_BYTES),)
        notes.append(f"guildcast: generated API key for this run: {api_keys[0]}")
    if args.workers > 1:
        from guildcast.workers import run_workers

        return run_workers(
            args.workers,
            args,
            list(argv) if argv is not None else sys.argv[1:],
            secret=secret,
            api_keys=api_keys,
            notes=notes,
            print_token=print_token,
        )
    cfg = Config(**{name: getattr(args, name) for name in _SERVE_FLAGS})
    cfg.secret = secret
    cfg.api_port = args.api_port if args.api_port >= 0 else None
    cfg.api_keys = api_keys
    cfg.previous_secrets = tuple(args.previous_secrets or args.env_previous_secrets)
    cfg.metrics_open = bool(args.metrics_open)
    cfg.demo_page = not args.no_demo
    cfg.reuse_port = os.environ.get("GUILDCAST_REUSE_PORT") == "1"
    cfg.metrics_node_label = worker
    coro = _serve(cfg, notes, print_token)
    if args.no_uvloop:
        status = asyncio.run(coro)
    else:
        import uvloop

        status = uvloop.run(coro)
    if argv is None:  # this process's own command line: nothing is left to do
        _exit_now(status)
    return status


def _exit_now(status: int) -> NoReturn:
    """Exit without tearing the interpreter down: the node has stopped (its
    broker closed: with ``--data-dir`` every journal fsynced and the clean
    stop recorded), and freeing a full node's objects one by one at exit
    took 0.4-0.5 s of a restart (19,000 sessions). Output and log handlers
    are flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
