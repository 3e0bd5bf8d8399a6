"""High-water marks: per guild, the last ``s`` its journal was known to hold.

Owns ``DIR/marks.log`` (``--data-dir``), a file kept apart from the journals
so that a journal that loses its tail cannot take its mark with it. The disk
broker (``guildcast.broker.disk``) writes a guild's mark right after each
journal write and before anything of that write is fanned out or
acknowledged, and compares it with the journal when it loads the guild.

Format: one JSON line per change, ``["gid", "epoch", s]`` (``s`` is the last
``s`` written under ``epoch``) or ``["gid", null, 0]`` (the journal was
deleted). The last line of a guild wins. A line that does not parse (a torn
last line after a crash) is skipped: it can only be a mark of a write that
never completed, or make a mark lower than it was (a weaker check, never a
wrong event).

Why this proves a cut (the consistency argument): let ``h`` be the last
``s`` a loaded journal holds and ``m`` its mark for the same epoch.

1. Every ``s`` a client was ever given (acknowledged or fanned out) was in
   the journal and then in the mark before it left the node, so every such
   ``s`` is ``<= m`` whenever the mark survived (a kill -9 keeps both: they
   are in the page cache; a power failure under ``interval``/``never`` resets
   every epoch anyway, see ``guildcast.broker.disk``).
2. The journal is append-only and its writer writes the mark only after a
   complete write, so a node that crashed (even in the middle of a write,
   leaving a torn tail) always restarts with ``h >= m``.
3. Hence ``h < m`` means the journal lost records after the mark was written
   (restored from an older copy, a volume that dropped writes, a manual
   truncation): ``s`` values ``h+1 .. m`` may have been seen by clients, and
   the guild must start a new epoch so that no known ``(epoch, s)`` is ever
   given to a different event. A journal whose epoch is not the mark's is
   older than the mark: also a new epoch.

What it cannot see: a whole data directory replaced by an older copy (its
marks are as old as its journals). docs/OPERATIONS.md, "Backups and
restore", gives the procedure for that: the ``RESTORED`` file, which makes
the next start give every guild a new epoch.

Memory: one ``(epoch, s)`` per guild with a journal. Disk: the file is
rewritten (temp file, fsync, rename) at start and whenever it has grown past
:data:`COMPACT_FACTOR` times its compacted size (and :data:`COMPACT_MIN`).
Writes happen on the event loop only (one ``write`` of one line); ``sync``
and the bulk of a compaction (:meth:`Marks.write_snapshot`) may run in a
thread: a compaction writes a snapshot of the table to the temp file there,
and back on the loop (:meth:`Marks.finish_compaction`) appends the marks
set meanwhile and renames it over the file, so no mark is lost.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import orjson

#: The file in ``--data-dir``.
MARKS_FILE = "marks.log"
#: Rewrite the file when it passes this many times its compacted size...
COMPACT_FACTOR = 4
#: ... and at least this many bytes: small nodes never rewrite it.
COMPACT_MIN = 1024 * 1024


class Marks:
    """The marks of every guild of one data directory (one writer: the broker)."""

    __slots__ = ("_compacted", "_fd", "_pending", "_size", "_torn", "dirty", "path", "table")

    def __init__(self, root: Path) -> None:
        self.path = root / MARKS_FILE
        #: gid -> (epoch, last s written).
        self.table: dict[str, tuple[str, int]] = {}
        self._fd: int | None = None
        self._size = 0
        self._compacted = 0
        #: A write failed part way: the next line starts with a newline, so
        #: only the torn line is lost.
        self._torn = False
        #: Written since the last fsync.
        self.dirty = False
        #: Marks set while a compaction writes its snapshot, or None.
        self._pending: dict[str, tuple[str, int] | None] | None = None

    @property
    def existed(self) -> bool:
        return self.path.exists()

    def open(self) -> bool:
        """Read the file, rewrite it compacted and open it for appending.

        Blocking (run it in a thread). Returns True if the file existed.
        """
        existed = True
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            existed = False
            data = b""
        for line in data.split(b"\n"):
            if not line:
                continue
            try:
                gid, epoch, s = orjson.loads(line)
            except (orjson.JSONDecodeError, ValueError, TypeError):
                continue  # torn or damaged: see the module docstring
            if type(gid) is not str or type(s) is not int:
                continue
            if epoch is None:
                self.table.pop(gid, None)
            elif type(epoch) is str:
                self.table[gid] = (epoch, s)
        self._rewrite()
        return existed

    def _encode_all(self) -> bytes:
        return _encode(self.table)

    def _rewrite(self) -> None:
        """Replace the file by one line per guild (temp, fsync, rename, fsync dir)."""
        data = self._encode_all()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._size = self._compacted = len(data)
        self.dirty = False

    def get(self, gid: str) -> tuple[str, int] | None:
        return self.table.get(gid)

    def set(self, gid: str, epoch: str, s: int) -> None:
        """Record that ``gid``'s journal holds ``s`` under ``epoch``; raises OSError."""
        self._write(orjson.dumps([gid, epoch, s]) + b"\n")
        self.table[gid] = (epoch, s)
        if self._pending is not None:
            self._pending[gid] = (epoch, s)

    def forget(self, gid: str) -> None:
        """``gid``'s journal was deleted; raises OSError."""
        if gid in self.table:
            self._write(orjson.dumps([gid, None, 0]) + b"\n")
            del self.table[gid]
            if self._pending is not None:
                self._pending[gid] = None

    def _write(self, line: bytes) -> None:
        if self._fd is None:
            raise OSError("the marks file is closed")
        if self._torn:
            line = b"\n" + line
        self._torn = True
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]
        self._torn = False
        self._size += len(line)
        self.dirty = True

    @property
    def needs_compaction(self) -> bool:
        return self._size > max(COMPACT_MIN, COMPACT_FACTOR * self._compacted)

    def compact(self) -> None:
        """Rewrite the file from the table, all at once (blocking; for tools
        and tests: the broker compacts with :meth:`begin_compaction`)."""
        self._rewrite()

    def begin_compaction(self) -> dict[str, tuple[str, int]]:
        """On the loop: a snapshot of the table for :meth:`write_snapshot`."""
        self._pending = {}
        return dict(self.table)

    def write_snapshot(self, snapshot: dict[str, tuple[str, int]]) -> int:
        """In a thread: write ``snapshot`` to the temp file and fsync it."""
        data = _encode(snapshot)
        with open(self._tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return len(data)

    def finish_compaction(self, size: int | None) -> None:
        """On the loop: append what changed since the snapshot and rename the
        temp file over the file (``size`` None: the snapshot failed)."""
        pending, self._pending = self._pending, None
        if size is None or pending is None:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            return
        tail = b"".join(
            orjson.dumps([g, None, 0] if m is None else [g, m[0], m[1]]) + b"\n"
            for g, m in pending.items()
        )
        try:
            fd = os.open(self._tmp, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            try:
                view = memoryview(tail)
                while view:
                    view = view[os.write(fd, view) :]
            except OSError:
                os.close(fd)
                raise
            os.replace(self._tmp, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            return  # the old file is whole: compact again later
        self.close()
        self._fd = fd
        self._size = size + len(tail)
        self._compacted = size
        self._torn = False
        # The tail and the rename are synced by the next sync (the old file,
        # should the rename be lost, held every mark up to now).
        self.dirty = True

    @property
    def _tmp(self) -> Path:
        return self.path.with_name(self.path.name + ".tmp")

    def sync(self) -> None:
        """fsync if written since the last one (may run in a thread)."""
        if not self.dirty or self._fd is None:
            return
        self.dirty = False
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _encode(table: dict[str, tuple[str, int]]) -> bytes:
    return b"".join(orjson.dumps([g, e, s]) + b"\n" for g, (e, s) in table.items())
