"""``python -m guildcast.examples.kanban``: the kanban service in one process
(the board page, its HTTP API and an embedded Guildcast gateway)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop
from aiohttp import web

from .app import Kanban, Settings, make_app
from .card import CARD_IDLE


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m guildcast.examples.kanban", description="A kanban board on Guildcast"
    )
    ap.add_argument("--data", default="kanban-data", help="data folder (default ./kanban-data)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8090, help="HTTP port of the page and API")
    ap.add_argument("--gateway-port", type=int, default=8091, help="Guildcast gateway port")
    ap.add_argument(
        "--card-idle", type=float, default=CARD_IDLE, help="seconds before an idle card stops"
    )
    ap.add_argument("--max-cards", type=int, default=10_000, help="card actors alive at once")
    ap.add_argument("--fsync", action="store_true", help="fsync every card write")
    ap.add_argument("--secret", default=None, help="token secret (default: a new one per run)")
    return ap


async def serve(settings: Settings, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Kanban(settings) as kb:
        runner = web.AppRunner(make_app(kb), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, settings.host, port)
            await site.start()
            host, bound = runner.addresses[0][:2]
            print(f"kanban: board page on http://{host}:{bound}/?board=demo", flush=True)
            print(f"kanban: guildcast gateway on {kb.server.url}", flush=True)
            await stop.wait()
            print("kanban: stopping (flushing cards)", flush=True)
        finally:
            await runner.cleanup()
    print("kanban: stopped", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    settings = Settings(
        data=Path(a.data),
        host=a.host,
        gateway_port=a.gateway_port,
        card_idle=a.card_idle,
        max_cards=a.max_cards,
        fsync=a.fsync,
        secret=a.secret,
    )
    try:
        uvloop.run(serve(settings, a.port))
    except OSError as e:
        print(f"kanban: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
