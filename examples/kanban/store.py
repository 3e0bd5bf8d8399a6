"""The kanban data folder: one JSON file per card and one per board.

``<data>/cards/<card id>.json`` is written only by that card's actor and
``<data>/boards/<board id>.json`` only by that board's actor (docs/ACTORS.md:
one owner per file), so nothing here locks. Every write is atomic: the new
content goes to a temporary file in the same folder, optionally fsynced, then
renamed over the old one (POSIX rename is atomic), so a reader or a restart
sees the old file or the new one, never half of either. Leftover temporary
files (a process killed mid-write) are removed when the store opens.

These functions block on the disk: actors call them through
``asyncio.to_thread``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

#: Card ids are file names: lowercase letters and digits only.
CARD_ID = re.compile(r"[a-z0-9]{1,32}")
#: Board ids become part of a guild id (``kanban.<board>``) and a file name.
BOARD_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
#: Longest card title, in characters.
MAX_TITLE = 200
_TMP = ".tmp"


@dataclass(frozen=True, slots=True)
class CardState:
    """One card as its file and its events hold it; ``version`` grows by one
    with every accepted change (optimistic concurrency)."""

    id: str
    board: str
    title: str
    column: str
    version: int
    archived: bool = False
    #: Wall-clock creation time (s): the order of cards within a column.
    created: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CardState:
        return cls(
            id=str(d["id"]),
            board=str(d["board"]),
            title=str(d["title"]),
            column=str(d["column"]),
            version=int(d["version"]),
            archived=bool(d.get("archived", False)),
            created=float(d.get("created", 0.0)),
        )

    def changed(self, **kw: Any) -> CardState:
        """This card with ``kw`` applied and the next version."""
        return replace(self, version=self.version + 1, **kw)


@dataclass(frozen=True, slots=True)
class BoardConfig:
    """A board's column order and work-in-progress limits (column -> cards)."""

    columns: tuple[str, ...] = ("todo", "doing", "done")
    wip: tuple[tuple[str, int], ...] = (("doing", 3),)

    def limit(self, column: str) -> int | None:
        return dict(self.wip).get(column)

    def as_dict(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "wip": dict(self.wip)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BoardConfig:
        columns = d.get("columns")
        wip = d.get("wip", {})
        if (
            not isinstance(columns, list)
            or not columns
            or len(columns) > 20
            or not all(isinstance(c, str) and BOARD_ID.fullmatch(c) for c in columns)
            or len(set(columns)) != len(columns)
        ):
            raise ValueError("columns: 1-20 distinct names of [a-z0-9-]")
        if not isinstance(wip, dict) or not all(
            k in columns and type(v) is int and v >= 0 for k, v in wip.items()
        ):
            raise ValueError("wip: {column: limit >= 0} for columns of the board")
        return cls(columns=tuple(columns), wip=tuple(sorted(wip.items())))


class Store:
    """The data folder. ``fsync`` makes each write survive a power cut, not
    only a killed process (the page cache survives a process)."""

    def __init__(self, root: Path, fsync: bool = False) -> None:
        self.root = root
        self.fsync = fsync
        self.cards = root / "cards"
        self.boards = root / "boards"
        for folder in (self.cards, self.boards):
            folder.mkdir(parents=True, exist_ok=True)
            for leftover in folder.glob(f"*{_TMP}"):
                leftover.unlink(missing_ok=True)

    def load_card(self, card_id: str) -> CardState | None:
        path = self.cards / f"{card_id}.json"
        try:
            return CardState.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return None

    def write_card(self, card: CardState) -> None:
        self._write(self.cards / f"{card.id}.json", card.as_dict())

    def cards_of(self, board: str) -> list[CardState]:
        """Every card file of ``board``, in creation order. Reads the whole
        folder: a board does this once when its actor starts."""
        found: list[CardState] = []
        for path in self.cards.glob("*.json"):
            try:
                card = CardState.from_dict(json.loads(path.read_text()))
            except FileNotFoundError:  # renamed away under us: not a card any more
                continue
            if card.board == board:
                found.append(card)
        found.sort(key=lambda c: (c.created, c.id))
        return found

    def load_board(self, board: str) -> BoardConfig | None:
        try:
            return BoardConfig.from_dict(json.loads((self.boards / f"{board}.json").read_text()))
        except FileNotFoundError:
            return None

    def write_board(self, board: str, config: BoardConfig) -> None:
        self._write(self.boards / f"{board}.json", config.as_dict())

    def _write(self, path: Path, obj: dict[str, Any]) -> None:
        tmp = path.with_name(path.name + _TMP)
        data = json.dumps(obj, separators=(",", ":")).encode()
        with open(tmp, "wb") as f:
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if self.fsync:
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
