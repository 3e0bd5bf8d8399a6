"""The card actor: one per card, the only reader and writer of its file.

Requests for one card (HTTP handlers running concurrently) become messages
to its actor and are answered one at a time, in order; no locks. Each
change carries the version the client last saw (optimistic concurrency): a
stale version is refused with the current state, never applied.

A change is checked here (the card exists, is not archived, the version
matches), then admitted by the board actor (columns, WIP limits; the board
publishes it to the board's guild), then applied.

Write-behind. The actor answers as soon as the change is applied in memory
and its write is queued: the write happens at the end of the actor's
current batch (every change of the batch in one atomic write-and-rename),
before the next batch is handled, so writes are batched and ordered and a
clean stop flushes what is left. What an acknowledgement promises:

- the change is applied, published to the board's guild, and will be
  written before the card handles anything else;
- it is on disk once the card's ``flushed_version`` (``GET /api/cards/ID``)
  has reached its version; from then on it survives the process being
  killed (and, with ``--fsync``, a power cut);
- a change acknowledged but not yet flushed is lost if the process is
  killed in that window (a few milliseconds); subscribers may then have seen
  an event the file does not hold.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from guildcast.actors import Actor, ActorExited, CallTimeout, MailboxFull, Registry, RegistryFull

from .board import Admit, Admitted, Board
from .store import CardState, Store

log = logging.getLogger("kanban.card")

#: A card with no request for this long stops; its next request starts it
#: again from its file.
CARD_IDLE = 30.0
#: How long a card waits for its board's admission (which includes a publish).
ADMIT_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Create:
    board: str
    title: str
    column: str


@dataclass(frozen=True, slots=True)
class Move:
    column: str
    version: int


@dataclass(frozen=True, slots=True)
class Edit:
    title: str
    version: int


@dataclass(frozen=True, slots=True)
class Archive:
    version: int


@dataclass(frozen=True, slots=True)
class Get:
    pass


@dataclass(frozen=True, slots=True)
class Outcome:
    """``status``: ok, conflict (stale version; ``card`` is the current
    state), invalid (refused by a rule), missing, exists, unavailable."""

    status: str
    card: CardState | None = None
    reason: str = ""
    flushed_version: int = 0


class Card(Actor):
    def __init__(
        self, card_id: str, store: Store, boards: Registry[Board], idle: float = CARD_IDLE
    ) -> None:
        super().__init__(card_id, idle_timeout=idle)
        self.store = store
        self.boards = boards
        self.state: CardState | None = None
        self.flushed_version = 0
        self._dirty = False

    async def on_start(self) -> None:
        self.state = await asyncio.to_thread(self.store.load_card, self.name)
        self.flushed_version = self.state.version if self.state is not None else 0

    async def on_stop(self, reason: BaseException | None) -> None:
        if self._dirty:
            await self._flush()

    async def handle_batch(self, batch: deque[Any]) -> None:
        try:
            await super().handle_batch(batch)
        finally:
            if self._dirty:
                await self._flush()

    async def _flush(self) -> None:
        state = self.state
        assert state is not None
        try:
            await asyncio.to_thread(self.store.write_card, state)
        except OSError:
            log.exception("card %s: write failed; retried after the next change", self.name)
            return
        self.flushed_version = state.version
        self._dirty = self.state is not state

    async def handle(self, msg: Any) -> Outcome:
        if isinstance(msg, Get):
            if self.state is None:
                return Outcome("missing")
            return Outcome("ok", self.state, flushed_version=self.flushed_version)
        if isinstance(msg, Create):
            if self.state is not None:
                return Outcome("exists", self.state)
            new = CardState(
                self.name, msg.board, msg.title, msg.column, version=1, created=time.time()
            )
            return await self._apply(None, new)
        if self.state is None:
            return Outcome("missing")
        cur = self.state
        if msg.version != cur.version:
            return Outcome("conflict", cur, f"version {msg.version} is stale: {cur.version}")
        if cur.archived:
            return Outcome("invalid", cur, "the card is archived")
        if isinstance(msg, Move):
            return await self._apply(cur, cur.changed(column=msg.column))
        if isinstance(msg, Edit):
            return await self._apply(cur, cur.changed(title=msg.title))
        if isinstance(msg, Archive):
            return await self._apply(cur, cur.changed(archived=True))
        raise TypeError(f"unknown message {msg!r}")

    async def _apply(self, before: CardState | None, after: CardState) -> Outcome:
        try:
            board = self.boards.lookup_or_start(after.board)
            verdict: Admitted = await board.call(Admit(before, after), ADMIT_TIMEOUT)
        except (RegistryFull, MailboxFull, ActorExited) as e:
            return Outcome("unavailable", before, f"board busy: {type(e).__name__}")
        except CallTimeout:
            # The board may still publish it: say so rather than guess.
            log.warning("card %s: board %s gave no answer in time", self.name, after.board)
            return Outcome("unavailable", before, "board did not answer in time")
        if not verdict.ok:
            return Outcome(verdict.kind, before, verdict.reason)
        self.state = after
        self._dirty = True
        return Outcome("ok", after, flushed_version=self.flushed_version)
