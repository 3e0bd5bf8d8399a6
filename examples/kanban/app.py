"""The kanban service: an embedded Guildcast ``Server``, a registry of card
actors, a registry of board actors, and an aiohttp application in front.

``Kanban`` is the composition root (``async with Kanban(settings) as kb``);
``make_app(kb)`` is the HTTP layer, which only parses requests, sends one
message to one actor, and turns its answer into a status code:

| route | what |
|---|---|
| ``GET /`` | the board page (``static/index.html``) |
| ``GET /guildcast.js`` | the Guildcast browser client, same origin as the page |
| ``GET /api/boards/{board}`` | columns, WIP limits, cards, the guild Position of |
| | that listing, and a gateway URL and token for following it |
| ``GET /api/boards/{board}/token`` | a fresh gateway URL and token (before a reconnect) |
| ``PUT /api/boards/{board}`` | ``{"columns": [...], "wip": {column: n}}`` |
| ``POST /api/boards/{board}/cards`` | ``{"title": str, "column": str?}`` -> 201 |
| ``GET /api/cards/{id}`` | the card and its ``flushed_version`` |
| ``POST /api/cards/{id}/move`` | ``{"column": str, "version": int}`` |
| ``POST /api/cards/{id}/edit`` | ``{"title": str, "version": int}`` |
| ``POST /api/cards/{id}/archive`` | ``{"version": int}`` |

Answers: 200/201 with ``{"card": ...}``; 409 ``{"error", "card"}`` for a
stale version (reload and retry); 422 ``{"error"}`` for a change a rule
refuses (unknown column, WIP limit, archived card); 404 for no such card;
400 for a malformed request; 503 with ``Retry-After`` when an actor or the
guild cannot take it now. There is no authentication: this is an example,
put your own in front of it.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web

from guildcast import Config, Server
from guildcast.actors import Registry
from guildcast.core.failures import Failure, answer

from .board import Board, Columns, Configure, Listing, guild_of
from .card import CARD_IDLE, Archive, Card, Create, Edit, Get, Move, Outcome
from .store import BOARD_ID, CARD_ID, MAX_TITLE, BoardConfig, Store

#: How long an HTTP request waits for an actor's answer before 503.
REQUEST_TIMEOUT = 35.0
#: Tokens handed to the page: long enough for a working session; the page
#: asks for a fresh one before every reconnect.
TOKEN_TTL = 3600.0

STATUS = {"ok": 200, "conflict": 409, "invalid": 422, "missing": 404, "exists": 409}


@dataclass(frozen=True)
class Settings:
    data: Path
    host: str = "127.0.0.1"
    #: Guildcast gateway port (0: a free one).
    gateway_port: int = 8091
    card_idle: float = CARD_IDLE
    #: Card actors alive at once; past it requests get 503 until some idle out.
    max_cards: int = 10_000
    max_boards: int = 1_000
    fsync: bool = False
    secret: str | None = None


class Kanban:
    """The service in one process. Enter it to start; leaving flushes every
    card and stops the embedded Guildcast."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = Store(settings.data, fsync=settings.fsync)
        self.server = Server(
            Config(
                host=settings.host,
                port=settings.gateway_port,
                secret=settings.secret,
                # The board's history is kept with the cards, so a restarted
                # service continues each guild and pages recover.
                data_dir=str(settings.data / "guildcast"),
            )
        )
        self._tg: asyncio.TaskGroup | None = None
        self.boards: Registry[Board] | None = None
        self.cards: Registry[Card] | None = None

    async def __aenter__(self) -> Kanban:
        await self.server.__aenter__()
        try:
            self._tg = asyncio.TaskGroup()
            tg = await self._tg.__aenter__()
            self.boards = Registry(
                lambda b: Board(b, self.store, self.server), tg, self.settings.max_boards
            )
            boards = self.boards
            self.cards = Registry(
                lambda c: Card(c, self.store, boards, self.settings.card_idle),
                tg,
                self.settings.max_cards,
            )
        except BaseException:
            await self.server.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        et: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            # Cards first: a card's last change may still need its board.
            if self.cards is not None:
                await self.cards.stop_all()
            if self.boards is not None:
                await self.boards.stop_all()
            if self._tg is not None:
                await self._tg.__aexit__(et, exc, tb)
        finally:
            await self.server.__aexit__(et, exc, tb)

    # --- what the HTTP layer asks ---------------------------------------------

    def _card(self, card_id: str) -> Card:
        assert self.cards is not None
        return self.cards.lookup_or_start(card_id)

    def _board(self, board: str) -> Board:
        assert self.boards is not None
        return self.boards.lookup_or_start(board)

    async def ask_card(self, card_id: str, msg: Any) -> Outcome:
        result: Outcome = await self._card(card_id).call(msg, REQUEST_TIMEOUT)
        return result

    async def create(self, board: str, title: str, column: str | None) -> Outcome:
        if column is None:
            columns = await self._board(board).call(Columns(), REQUEST_TIMEOUT)
            column = columns[0]
        return await self.ask_card(secrets.token_hex(8), Create(board, title, column))

    async def listing(self, board: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._board(board).call(Listing(), REQUEST_TIMEOUT)
        return result

    async def configure(self, board: str, config: BoardConfig) -> Any:
        return await self._board(board).call(Configure(config), REQUEST_TIMEOUT)

    def viewer_token(self, board: str) -> str:
        """A token to follow one board's guild, and nothing else."""
        return self.server.token(
            f"viewer-{secrets.token_hex(4)}", guilds=[guild_of(board)], ttl=TOKEN_TTL
        )


# --- HTTP -----------------------------------------------------------------------

KANBAN: web.AppKey[Kanban] = web.AppKey("kanban", Kanban)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    headers = {"Retry-After": "1"} if status == 503 else None
    return web.json_response({"error": message, **extra}, status=status, headers=headers)


def _answer(out: Outcome, created: bool = False) -> web.Response:
    if out.status == "unavailable":
        return _error(503, out.reason or "try again")
    status = STATUS[out.status]
    if status == 200 and created:
        status = 201
    body: dict[str, Any] = {}
    if out.card is not None:
        body["card"] = out.card.as_dict()
    if status >= 400:
        body["error"] = out.reason or out.status
    else:
        body["flushed_version"] = out.flushed_version
    return web.json_response(body, status=status)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="the body is not JSON") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object")
    return body


def _version(body: dict[str, Any]) -> int:
    v = body.get("version")
    if type(v) is not int or v < 1:
        raise web.HTTPBadRequest(text="version: the card version you last saw (int >= 1)")
    return v


def _title(body: dict[str, Any]) -> str:
    t = body.get("title")
    if not isinstance(t, str) or not t.strip() or len(t) > MAX_TITLE:
        raise web.HTTPBadRequest(text=f"title: 1-{MAX_TITLE} characters")
    return t.strip()


def _column(body: dict[str, Any], required: bool) -> str | None:
    c = body.get("column")
    if c is None and not required:
        return None
    if not isinstance(c, str) or not BOARD_ID.fullmatch(c):
        raise web.HTTPBadRequest(text="column: a column name")
    return c


def _board_id(request: web.Request) -> str:
    b = request.match_info["board"]
    if not BOARD_ID.fullmatch(b):
        raise web.HTTPBadRequest(text="board ids are 1-40 of [a-z0-9-]")
    return b


def _card_id(request: web.Request) -> str:
    c = request.match_info["card"]
    if not CARD_ID.fullmatch(c):
        raise web.HTTPNotFound(text="no such card")
    return c


@web.middleware
async def _busy_is_503(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
    except Failure as e:
        # The runtime's failures (a full registry or mailbox, an exited actor,
        # a call that timed out) answer as the gateway's own HTTP API does:
        # one table, server/core/failures.py.
        a = answer(e)
        return web.json_response(
            {"error": a.error, "detail": str(e)}, status=a.status, headers=a.headers
        )
    return response


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(Path(__file__).parent / "static" / "index.html")


async def _client_js(request: web.Request) -> web.Response:
    js = resources.files("guildcast.transport").joinpath("static/guildcast.js").read_bytes()
    return web.Response(body=js, content_type="text/javascript")


async def _get_board(request: web.Request) -> web.Response:
    kb = request.app[KANBAN]
    board = _board_id(request)
    listing = await kb.listing(board)
    listing["gateway"] = kb.server.url
    listing["token"] = kb.viewer_token(board)
    return web.json_response(listing)


async def _token(request: web.Request) -> web.Response:
    kb = request.app[KANBAN]
    board = _board_id(request)
    return web.json_response({"gateway": kb.server.url, "token": kb.viewer_token(board)})


async def _put_board(request: web.Request) -> web.Response:
    kb = request.app[KANBAN]
    board = _board_id(request)
    try:
        config = BoardConfig.from_dict(await _body(request))
    except ValueError as e:
        return _error(400, str(e))
    verdict = await kb.configure(board, config)
    if not verdict.ok:
        return _error(422, verdict.reason)
    return web.json_response(config.as_dict())


async def _create(request: web.Request) -> web.Response:
    kb = request.app[KANBAN]
    board = _board_id(request)
    body = await _body(request)
    return _answer(await kb.create(board, _title(body), _column(body, False)), created=True)


async def _get_card(request: web.Request) -> web.Response:
    return _answer(await request.app[KANBAN].ask_card(_card_id(request), Get()))


async def _move(request: web.Request) -> web.Response:
    card, body = _card_id(request), await _body(request)
    column = _column(body, True)
    assert column is not None
    return _answer(await request.app[KANBAN].ask_card(card, Move(column, _version(body))))


async def _edit(request: web.Request) -> web.Response:
    card, body = _card_id(request), await _body(request)
    msg = Edit(_title(body), _version(body))
    return _answer(await request.app[KANBAN].ask_card(card, msg))


async def _archive(request: web.Request) -> web.Response:
    card, body = _card_id(request), await _body(request)
    return _answer(await request.app[KANBAN].ask_card(card, Archive(_version(body))))


def make_app(kb: Kanban) -> web.Application:
    app = web.Application(middlewares=[_busy_is_503], client_max_size=64 * 1024)
    app[KANBAN] = kb
    app.router.add_get("/", _index)
    app.router.add_get("/guildcast.js", _client_js)
    app.router.add_get("/api/boards/{board}", _get_board)
    app.router.add_get("/api/boards/{board}/token", _token)
    app.router.add_put("/api/boards/{board}", _put_board)
    app.router.add_post("/api/boards/{board}/cards", _create)
    app.router.add_get("/api/cards/{card}", _get_card)
    app.router.add_post("/api/cards/{card}/move", _move)
    app.router.add_post("/api/cards/{card}/edit", _edit)
    app.router.add_post("/api/cards/{card}/archive", _archive)
    return app
