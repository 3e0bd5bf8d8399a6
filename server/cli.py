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
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from guildcast.config import Config

log = logging.getLogger("guildcast")

#: Config fields exposed as ``serve`` flags, with their help text.
_SERVE_FLAGS: dict[str, str] = {
    "host": "gateway listen address",
    "port": "gateway port (0: any free port)",
    "secret": "HS256 token secret (default: generated and printed)",
    "heartbeat_interval_ms": "heartbeat interval announced in HELLO",
    "history_size": "events kept per guild for recovery",
    "history_ttl": "seconds an event stays in history",
    "partition_size": "sessions per partition actor",
    "max_buffer": "unsent bytes per connection before close 4010",
    "max_frame": "largest incoming message in bytes (1009 past it)",
    "max_payload": "largest PUBLISH in bytes (ERROR 4413 past it)",
    "publish_rate": "default PUBLISH events/s per connection (0: unlimited)",
    "max_connections": "connections before close 1013",
    "max_subscriptions": "guilds per session",
    "max_pending_publishes": "PUBLISHes awaiting an answer per session (close 4008 past it)",
    "max_guilds": "guild actors alive at once",
    "idle_timeout": "seconds before an unused guild actor stops",
    "drain_timeout": "seconds a graceful shutdown waits for clients",
    "redis": "redis://HOST:PORT/DB: run as a cluster node over this Redis",
    "node_id": "this node's name in the cluster (default host:pid)",
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
    "redis_timeout": "seconds a Redis command may take before it counts as failed",
    "feed_deadline": "seconds the Redis pub/sub feed may stay silent before it is resubscribed",
}


#: ``guildcast serve``'s API port; an embedded ``Config`` runs no API by default.
DEFAULT_API_PORT = 8081


def _env_list(name: str) -> list[str]:
    """A comma-separated environment variable as a list, blanks dropped."""
    return [v for v in (part.strip() for part in os.environ.get(name, "").split(",")) if v]


def _env_default(name: str, default: Any) -> Any:
    raw = os.environ.get("GUILDCAST_" + name.upper())
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


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
            default=_env_default(name, default),
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
    p.add_argument("--secret", default=os.environ.get("GUILDCAST_SECRET"))
    p.add_argument("--sub", required=True, help="the user")
    p.add_argument("--guilds", action="append", default=None, help="subscribe pattern (repeat)")
    p.add_argument("--pub", action="append", default=None, help="publish pattern (repeat)")
    p.add_argument("--pub-rate", type=float, default=None, help="PUBLISH events/s (0: none)")
    p.add_argument("--ttl", type=float, default=3600, help="seconds until expiry (0: never)")


def build_parser() -> argparse.ArgumentParser:
    from guildcast import __version__

    parser = argparse.ArgumentParser(prog="guildcast", description="Guildcast fanout server")
    parser.add_argument("--version", action="version", version=f"guildcast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _token_parser(sub)
    # Listed for --help only: main() hands everything after it to loadtest's own parser.
    sub.add_parser("loadtest", help="load-test a server (options: guildcast loadtest --help)")
    return parser


async def _serve(cfg: Config, print_token: bool) -> int:
    from guildcast.node import Server

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Server(cfg) as srv:
        print(f"guildcast: gateway on {srv.url}", flush=True)
        if srv.api is not None:
            print(f"guildcast: api on {srv.api_url}", flush=True)
            if not cfg.api_keys:
                print(f"guildcast: generated API key for this run: {srv.api_key}", flush=True)
        if print_token:
            print(f"guildcast: generated secret for this run: {srv.secret}", flush=True)
            tok = srv.token("demo", guilds=["*"], pub=["*"], ttl=24 * 3600)
            print(f"guildcast: a token for user 'demo' (all guilds, 24 h): {tok}", flush=True)
            page = srv.url.replace("ws://", "http://", 1).removesuffix("/gateway")
            print(f"guildcast: live demo board: {page}/#token={tok}&guild=demo", flush=True)
        await stop.wait()
        print("guildcast: draining", flush=True)
    print("guildcast: stopped", flush=True)
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
        from guildcast.core.tokens import make_token

        if not args.secret:
            print("guildcast token: give --secret or set GUILDCAST_SECRET", file=sys.stderr)
            return 2
        print(
            make_token(
                args.secret,
                args.sub,
                args.guilds or ["*"],
                args.pub or [],
                args.pub_rate,
                args.ttl or None,
            )
        )
        return 0
    from guildcast import logs
    from guildcast.core.journal import FSYNC_POLICIES

    try:
        logs.setup(args.log_level, args.log_format)
    except ValueError as e:
        print(f"guildcast serve: {e}", file=sys.stderr)
        return 2
    if args.fsync not in FSYNC_POLICIES:
        print(f"guildcast serve: --fsync must be one of {FSYNC_POLICIES}", file=sys.stderr)
        return 2
    api_keys = tuple(args.api_keys or args.env_api_keys)
    if args.workers > 1 and not api_keys and args.api_port >= 0:
        # Every worker must accept the same key: generate it here, hand it down.
        import secrets

        key = secrets.token_urlsafe(24)
        os.environ["GUILDCAST_API_KEYS"] = key
        print(f"guildcast: generated API key for this run: {key}", flush=True)
    if args.workers > 1:
        from guildcast.workers import run_workers

        return run_workers(args.workers, args, list(argv) if argv is not None else sys.argv[1:])
    cfg = Config(**{name: getattr(args, name) for name in _SERVE_FLAGS})
    cfg.api_port = args.api_port if args.api_port >= 0 else None
    cfg.api_keys = api_keys
    cfg.previous_secrets = tuple(args.previous_secrets or args.env_previous_secrets)
    cfg.metrics_open = bool(args.metrics_open)
    cfg.reuse_port = os.environ.get("GUILDCAST_REUSE_PORT") == "1"
    coro = _serve(cfg, print_token=cfg.secret is None)
    if args.no_uvloop:
        return asyncio.run(coro)
    import uvloop

    return uvloop.run(coro)


if __name__ == "__main__":
    sys.exit(main())
