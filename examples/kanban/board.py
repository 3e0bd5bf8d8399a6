"""The board actor: one per board, owning its columns, WIP limits, its
projection of the board's cards, and the board's guild.

Every change to a card is admitted here before the card applies it: the board
checks the target column and its WIP limit against its projection, publishes
the change to the board's guild (``kanban.<board>``) through the embedded
Guildcast ``Server``, updates the projection, and only then says yes. So an
accepted change is a published change, and the projection, the guild's
events and the cards agree on the order of changes: the board handles one
admission at a time.

Why a projection and not "ask every card actor": listing a board is the most
frequent read, and asking N card actors means starting N actors (and reading
N files) for one page view. The projection is rebuilt from the card files
when the board actor starts (one folder scan) and kept current by the
admissions, which every change passes through. It is the board's view of
the cards, not their owner: a card's file stays its own.

The listing carries the guild Position ``(epoch, s)`` of the last change the
projection includes, read in the same actor step: a page that subscribes
with that Position gets exactly the changes after its snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from guildcast import Server
from guildcast.actors import Actor
from guildcast.core.host import Overloaded

from .store import BoardConfig, CardState, Store

log = logging.getLogger("kanban.board")

#: A board with no admission or listing for this long stops (its projection
#: is rebuilt from the files when it starts again).
BOARD_IDLE = 120.0


def guild_of(board: str) -> str:
    """The Guildcast guild a board's changes are published to."""
    return f"kanban.{board}"


@dataclass(frozen=True, slots=True)
class Admit:
    """May ``after`` replace ``before`` (None: a new card)? Published if yes."""

    before: CardState | None
    after: CardState


@dataclass(frozen=True, slots=True)
class Admitted:
    ok: bool
    reason: str = ""
    #: "invalid" (a rule of the board refuses it) or "unavailable" (try again).
    kind: str = ""
    s: int = 0


@dataclass(frozen=True, slots=True)
class Listing:
    """Ask for the board: columns, limits, cards and the Position they are at."""


@dataclass(frozen=True, slots=True)
class Columns:
    """Ask for the column order only (cheap: no listing of the cards)."""


@dataclass(frozen=True, slots=True)
class Configure:
    config: BoardConfig


def event_name(before: CardState | None, after: CardState) -> str:
    if before is None:
        return "CARD_CREATED"
    if after.archived:
        return "CARD_ARCHIVED"
    if after.column != before.column:
        return "CARD_MOVED"
    return "CARD_EDITED"


class Board(Actor):
    def __init__(self, board: str, store: Store, server: Server, idle: float = BOARD_IDLE) -> None:
        super().__init__(board, idle_timeout=idle)
        self.store = store
        self.server = server
        self.gid = guild_of(board)
        self.config = BoardConfig()
        #: card id -> latest accepted state, archived cards left out.
        self.cards: dict[str, CardState] = {}
        self.epoch = ""
        self.s = 0

    async def on_start(self) -> None:
        saved = await asyncio.to_thread(self.store.load_board, self.name)
        if saved is not None:
            self.config = saved
        for card in await asyncio.to_thread(self.store.cards_of, self.name):
            if not card.archived:
                self.cards[card.id] = card
        self.epoch, self.s = await self.server.head(self.gid)

    async def handle(self, msg: Any) -> Any:
        if isinstance(msg, Admit):
            return await self._admit(msg.before, msg.after)
        if isinstance(msg, Listing):
            return self._listing()
        if isinstance(msg, Columns):
            return self.config.columns
        if isinstance(msg, Configure):
            return await self._configure(msg.config)
        raise TypeError(f"unknown message {msg!r}")

    def _count(self, column: str, excluding: str) -> int:
        return sum(1 for c in self.cards.values() if c.column == column and c.id != excluding)

    async def _admit(self, before: CardState | None, after: CardState) -> Admitted:
        if after.column not in self.config.columns:
            return Admitted(False, f"no column {after.column!r} on this board", "invalid")
        entering = not after.archived and (before is None or before.column != after.column)
        limit = self.config.limit(after.column)
        if entering and limit is not None and self._count(after.column, after.id) >= limit:
            return Admitted(
                False, f"column {after.column!r} is at its WIP limit {limit}", "invalid"
            )
        try:
            s, epoch = await self.server.publish_ex(
                self.gid, event_name(before, after), after.as_dict()
            )
        except Overloaded as e:
            return Admitted(False, f"cannot publish now: {e}", "unavailable")
        self.epoch, self.s = epoch, s
        if after.archived:
            self.cards.pop(after.id, None)
        else:
            self.cards[after.id] = after
        return Admitted(True, s=s)

    def _listing(self) -> dict[str, Any]:
        order = {c: i for i, c in enumerate(self.config.columns)}
        cards = sorted(self.cards.values(), key=lambda c: (order[c.column], c.created, c.id))
        return {
            "board": self.name,
            "guild": self.gid,
            **self.config.as_dict(),
            "cards": [c.as_dict() for c in cards],
            "position": {"epoch": self.epoch, "s": self.s},
        }

    async def _configure(self, config: BoardConfig) -> Admitted:
        used = {c.column for c in self.cards.values()}
        if missing := used - set(config.columns):
            return Admitted(False, f"columns still hold cards: {sorted(missing)}", "invalid")
        for column in config.columns:
            limit = config.limit(column)
            if limit is not None and self._count(column, "") > limit:
                return Admitted(False, f"column {column!r} holds more than {limit}", "invalid")
        await asyncio.to_thread(self.store.write_board, self.name, config)
        self.config = config
        return Admitted(True, s=self.s)
