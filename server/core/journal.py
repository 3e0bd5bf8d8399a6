"""Durable guild history: one append-only journal file per guild (``--data-dir``).

Owns the on-disk format, its loading and its repair. The guild actor that
owns a guild is the only writer of that guild's file (docs/DESIGN.md,
"Durability"): its appends go through the disk broker
(``guildcast.broker.disk``), one write per mailbox batch. A :class:`Journal`
has no locks. Blocking calls (``load``, ``rewrite``, ``sync``) are plain
functions that the broker runs with ``asyncio.to_thread`` and awaits; the
only call that may overlap the writer is a background ``sync`` (an fsync
never changes the file).

File name: ``g-<base32(guild id)>.log`` in lower case without padding. Guild
ids may be ``..`` or contain ``:``, so they are never used raw; base32 is
safe on case-insensitive file systems and a 128-character id gives a
211-byte name (under the usual 255-byte limit).

Records (all integers big-endian)::

    u32 length | u32 crc32(body) | u32 crc32(the 8 bytes before) | body

    body = b"H" + JSON {"v": 1, "guild": gid, "epoch": str, "base": int, "gen": int}
         | b"E" + u64 s + f64 ts + u8 len(t) + t + payload
         | b"F" + u64 s + f64 ts + u8 len(t) + t + key + payload
         | b"K" + u64 s + f64 ts + key

    key = u8 len(k) + k + u8 len(digest) + digest

The header record (``H``) comes first and exactly once; ``base`` is the
``s`` before the file's first event (0 for a new guild, more after a
compaction). Event records (``E``, ``F``) follow with ``s = base + 1,
base + 2, ...``; ``payload`` is the DISPATCH JSON exactly as sent to
subscribers (encoded once, docs/DESIGN.md rule 1). ``gen`` is the data
directory's generation when the header was written
(``guildcast.broker.disk``: a start after a possible power failure raises
the generation below which epochs are no longer trusted).

Idempotency keys (PROTOCOL.md "Idempotent publish"): an event published
with a key is an ``F`` record, an ``E`` record plus the key and its content
digest, in one record, so the key is durable exactly when its event is.
A compaction writes the guild's live window (``guildcast.core.idempotency``)
as ``K`` records right after the header: keys whose events the compaction
drops stay remembered. ``F`` counts as an event; ``K`` does not. A journal
without keys holds neither, so the format of every existing journal is
unchanged, and an earlier version reads what this one writes without
keys; an earlier version that finds an ``F`` or ``K`` record treats it as
corruption (docs/OPERATIONS.md, "Upgrades and downgrades").

Consistency model and repair: a record is trusted only if both CRCs match.
Loading stops at the first record that is not, and truncates the file
there with a warning. A *torn* tail (an incomplete last record, or only
zero bytes, what a crash in the middle of a write or a power failure
leaves) held nothing that was acknowledged or fanned out: the guild writes
before it answers or sends. Anything else (a complete record with a bad
CRC, a broken sequence) is *corruption*: events that clients saw may be
gone, so :attr:`Loaded.lost` tells the guild to start a new epoch rather
than give a known ``s`` to a different event (PROTOCOL.md: "An epoch changes
only when a guild's history is lost"). A journal cut cleanly at a record
boundary loads without complaint here; the broker compares it with the
guild's high-water mark (``guildcast.core.marks``) to tell.
"""

from __future__ import annotations

import base64
import contextlib
import os
import struct
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guildcast.protocol import wire

FORMAT_VERSION = 1
_HEAD = struct.Struct(">II")  # length, crc32(body)
_HCRC = struct.Struct(">I")  # crc32 of the 8 bytes above
_META = struct.Struct(">QdB")  # s, ts, len(t)
_KEYMETA = struct.Struct(">Qd")  # s, ts
RECORD_OVERHEAD = _HEAD.size + _HCRC.size
_KIND_HEADER = ord("H")
_KIND_EVENT = ord("E")
_KIND_KEYED = ord("F")
_KIND_KEY = ord("K")
#: A record holds one event, bounded far below this by ``max_payload``; a
#: length past it can only come from corruption.
MAX_RECORD = 64 * 1024 * 1024

FSYNC_POLICIES = ("always", "interval", "never")
SUFFIX = ".log"
#: Suffix of a journal being rewritten; left behind only by a crash, and
#: removed at start (``guildcast.broker.disk``).
TMP_SUFFIX = ".tmp"


def file_name(gid: str) -> str:
    """The journal file name for guild ``gid``: never the raw id."""
    code = base64.b32encode(gid.encode()).decode("ascii").rstrip("=").lower()
    return f"g-{code}{SUFFIX}"


def guild_of(name: str) -> str | None:
    """The guild id encoded in a journal file name, or None if it is not one."""
    if not (name.startswith("g-") and name.endswith(SUFFIX)):
        return None
    code = name[2 : -len(SUFFIX)].upper()
    try:
        return base64.b32decode(code + "=" * (-len(code) % 8)).decode()
    except (ValueError, UnicodeDecodeError):
        return None


def journal_path(directory: str | os.PathLike[str], gid: str) -> Path:
    return Path(directory) / file_name(gid)


def _record(body: bytes) -> bytes:
    head = _HEAD.pack(len(body), zlib.crc32(body))
    return head + _HCRC.pack(zlib.crc32(head)) + body


def header_record(gid: str, epoch: str, base: int, gen: int = 0) -> bytes:
    """The first record of a journal."""
    meta = {"v": FORMAT_VERSION, "guild": gid, "epoch": epoch, "base": base, "gen": gen}
    return _record(b"H" + wire.encode(meta))


def event_prefix(s: int, t: str, ts: float, payload: bytes) -> bytes:
    """Everything of an event record before its payload; write the payload right after.

    Split so the guild writes the payload bytes it already has without
    copying them into a new record first.
    """
    tb = t.encode("ascii")
    meta = b"E" + _META.pack(s, ts, len(tb)) + tb
    crc = zlib.crc32(payload, zlib.crc32(meta))
    head = _HEAD.pack(len(meta) + len(payload), crc)
    return head + _HCRC.pack(zlib.crc32(head)) + meta


def _key_bytes(key: str, digest: bytes) -> bytes:
    kb = key.encode("ascii")
    return bytes((len(kb),)) + kb + bytes((len(digest),)) + digest


def keyed_event_prefix(s: int, t: str, ts: float, key: str, digest: bytes, payload: bytes) -> bytes:
    """:func:`event_prefix` of an event published with an idempotency key:
    the ``F`` record holds the key and its content digest with the event."""
    tb = t.encode("ascii")
    meta = b"F" + _META.pack(s, ts, len(tb)) + tb + _key_bytes(key, digest)
    crc = zlib.crc32(payload, zlib.crc32(meta))
    head = _HEAD.pack(len(meta) + len(payload), crc)
    return head + _HCRC.pack(zlib.crc32(head)) + meta


def key_record(s: int, ts: float, key: str, digest: bytes) -> bytes:
    """A ``K`` record: a key of the window whose event a compaction may drop."""
    return _record(b"K" + _KEYMETA.pack(s, ts) + _key_bytes(key, digest))


@dataclass(slots=True)
class StoredKey:
    """An idempotency key as stored: the event ``s`` it sequenced and when."""

    key: str
    s: int
    ts: float
    digest: bytes


@dataclass(slots=True)
class Stored:
    """One event as stored: its number, name, publish time and DISPATCH JSON."""

    s: int
    t: str
    ts: float
    payload: bytes


@dataclass(slots=True)
class Loaded:
    """What :func:`load` found."""

    #: The guild's epoch, or None when there was no usable journal.
    epoch: str | None = None
    #: The ``s`` before the file's first event.
    base: int = 0
    #: The last ``keep`` events, oldest first.
    events: list[Stored] = field(default_factory=list)
    #: Event records in the file (all of them, not only ``events``).
    count: int = 0
    #: Publish time of the file's oldest event, or None.
    first_ts: float | None = None
    #: Good bytes (the file's size after any repair).
    size: int = 0
    #: What was wrong and what was done about it, for the operator; None if clean.
    repair: str | None = None
    #: True when the damage may have removed acknowledged events: start a new epoch.
    lost: bool = False
    #: The last ``s`` in the file.
    head: int = 0
    #: The generation the header was written in.
    gen: int = 0
    #: Idempotency keys of ``F`` and ``K`` records, in file order.
    keys: list[StoredKey] = field(default_factory=list)


class _Bad(Exception):
    def __init__(self, reason: str, torn: bool) -> None:
        super().__init__(reason)
        self.torn = torn


def load(path: Path, gid: str, keep: int | None = None) -> Loaded:
    """Read ``path`` (the journal of ``gid``), repairing a damaged tail in place.

    Blocking: run it in a thread. Returns an empty :class:`Loaded` when the
    file does not exist. A torn or corrupt tail is truncated (``repair`` says
    how); a file whose header cannot be trusted is renamed to ``*.corrupt``
    and reported as ``lost`` with no epoch. Raises OSError only for I/O
    errors (permissions, a failing disk), never for bad content.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Loaded()
    events: deque[Stored] = deque(maxlen=keep)
    out = Loaded(size=len(data))
    off = 0
    n = len(data)
    view = memoryview(data)
    try:
        body, off = _next_record(view, off)
        meta = _parse_header(body, gid)
        out.epoch = meta["epoch"]
        out.base = out.head = meta["base"]
        out.gen = meta.get("gen", 0)
        while off < n:
            body, end = _next_record(view, off)
            rk = body[0]
            if rk == _KIND_KEY:
                out.keys.append(_parse_key(body, off))
                off = end
                continue
            if rk not in (_KIND_EVENT, _KIND_KEYED) or len(body) < 1 + _META.size:
                raise _Bad(f"record at byte {off} is not an event", torn=False)
            s, ts, tlen = _META.unpack_from(body, 1)
            if s != out.head + 1:
                raise _Bad(f"record at byte {off} has s={s}, expected {out.head + 1}", torn=False)
            start = 1 + _META.size
            try:
                t = bytes(body[start : start + tlen]).decode("ascii")
            except UnicodeDecodeError:
                raise _Bad(f"record at byte {off} has a bad event name", torn=False) from None
            start += tlen
            if rk == _KIND_KEYED:
                key, dg, start = _read_key(body, start, off)
                out.keys.append(StoredKey(key, s, ts, dg))
            events.append(Stored(s, t, ts, bytes(body[start:])))
            if out.first_ts is None:
                out.first_ts = ts
            out.count += 1
            out.head = s
            off = end
    except _Bad as bad:
        dropped = n - off
        if out.epoch is None:
            # The header itself is bad: nothing in this file can be trusted.
            aside = path.with_name(path.name + ".corrupt")
            os.replace(path, aside)
            return Loaded(
                repair=f"unreadable journal header ({bad}); moved the file to {aside.name}",
                lost=True,
            )
        kind = "torn tail" if bad.torn else "corrupt record"
        out.repair = f"{kind}: {bad}; truncated {dropped} bytes at byte {off}"
        out.lost = not bad.torn
        out.size = off
        with open(path, "r+b") as f:
            f.truncate(off)
            f.flush()
            os.fsync(f.fileno())
    out.events = list(events)
    return out


def _read_key(body: memoryview, start: int, off: int) -> tuple[str, bytes, int]:
    """The key and digest at ``start`` of a record's body, and the offset after."""
    try:
        klen = body[start]
        key = bytes(body[start + 1 : start + 1 + klen]).decode("ascii")
        at = start + 1 + klen
        dlen = body[at]
        dg = bytes(body[at + 1 : at + 1 + dlen])
    except (IndexError, UnicodeDecodeError):
        raise _Bad(f"record at byte {off} has a bad idempotency key", torn=False) from None
    if not key or len(key) != klen or len(dg) != dlen:
        raise _Bad(f"record at byte {off} has a bad idempotency key", torn=False)
    return key, dg, at + 1 + dlen


def _parse_key(body: memoryview, off: int) -> StoredKey:
    if len(body) < 1 + _KEYMETA.size:
        raise _Bad(f"record at byte {off} is a short key record", torn=False)
    s, ts = _KEYMETA.unpack_from(body, 1)
    key, dg, end = _read_key(body, 1 + _KEYMETA.size, off)
    if end != len(body):
        raise _Bad(f"record at byte {off} is a key record of the wrong length", torn=False)
    return StoredKey(key, s, ts, dg)


def _next_record(view: memoryview, off: int) -> tuple[memoryview, int]:
    """The body of the record at ``off`` and the offset after it; raises _Bad."""
    n = len(view)
    if n - off < RECORD_OVERHEAD:
        raise _Bad(f"{n - off} bytes at byte {off} are less than a record header", torn=True)
    length, crc = _HEAD.unpack_from(view, off)
    (hcrc,) = _HCRC.unpack_from(view, off + _HEAD.size)
    if zlib.crc32(view[off : off + _HEAD.size]) != hcrc:
        if not any(view[off:]):
            raise _Bad(f"{n - off} zero bytes at byte {off}", torn=True)
        raise _Bad(f"record header at byte {off} fails its checksum", torn=False)
    if length == 0 or length > MAX_RECORD:
        raise _Bad(f"record at byte {off} has an impossible length {length}", torn=False)
    start = off + RECORD_OVERHEAD
    end = start + length
    if end > n:
        raise _Bad(f"record at byte {off} needs {length} bytes, {n - start} left", torn=True)
    body = view[start:end]
    if zlib.crc32(body) != crc:
        raise _Bad(f"record at byte {off} fails its checksum", torn=False)
    return body, end


def _parse_header(body: memoryview, gid: str) -> dict[str, Any]:
    if body[0] != _KIND_HEADER:
        raise _Bad("the first record is not a header", torn=False)
    try:
        meta = wire.decode(body[1:])
    except wire.JSONDecodeError:
        raise _Bad("the header is not JSON", torn=False) from None
    if (
        type(meta) is not dict
        or meta.get("v") != FORMAT_VERSION
        or meta.get("guild") != gid
        or type(meta.get("epoch")) is not str
        or type(meta.get("base")) is not int
        or meta["base"] < 0
        or type(meta.get("gen", 0)) is not int
    ):
        raise _Bad(f"the header does not describe guild {gid!r} in format v1", torn=False)
    return meta


class Journal:
    """The appendable journal of one guild, written only on behalf of its guild actor.

    The file is opened on the first write (a guild that is only read leaves
    no file behind) and always starts with its header: :meth:`rewrite`
    creates it whole, by temp file, fsync and rename, so a crash never
    leaves a journal without its header.
    """

    __slots__ = ("_fd", "broken", "count", "dirty", "first_ts", "gen", "gid", "path", "size")

    def __init__(self, path: Path, gid: str, gen: int = 0) -> None:
        self.path = path
        self.gid = gid
        #: Written into the header by :meth:`rewrite`.
        self.gen = gen
        self._fd: int | None = None
        #: Event records in the file and the publish time of the oldest.
        self.count = 0
        self.first_ts: float | None = None
        self.size = 0
        #: Written since the last fsync.
        self.dirty = False
        #: Set when a failed write could not be undone, or an fsync failed: the
        #: file's tail is unknown, so nothing more is written until a restart
        #: (whose load repairs the tail).
        self.broken: str | None = None

    @property
    def is_open(self) -> bool:
        """True while a file descriptor is held (see :meth:`close`)."""
        return self._fd is not None

    @property
    def exists(self) -> bool:
        """True once the file holds at least its header (after load or rewrite)."""
        return self.size > 0

    def adopt(self, loaded: Loaded) -> None:
        """Continue the file :func:`load` read (it was repaired if needed)."""
        self.count = loaded.count
        self.first_ts = loaded.first_ts
        self.size = loaded.size

    def append(self, data: bytes, events: int, first_ts: float) -> None:
        """Append already encoded records (one ``write``; loops on a short write).

        Blocking only as long as a write to the page cache. On OSError the
        file is truncated back to where it was and the error re-raised; if
        even that fails the journal is marked :attr:`broken` and refuses
        every later write (the next load repairs the tail).
        """
        if self.broken is not None:
            raise OSError(f"journal unusable until restart: {self.broken}")
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        fd = self._fd
        view = memoryview(data)
        try:
            while view:
                written = os.write(fd, view)
                view = view[written:]
        except OSError as e:
            try:
                os.ftruncate(fd, self.size)
            except OSError as e2:
                self.broken = f"write failed ({e}) and could not be undone ({e2})"
            raise
        self.size += len(data)
        if self.count == 0:
            self.first_ts = first_ts
        self.count += events
        self.dirty = True

    def undo(self, size: int, count: int, first_ts: float | None) -> None:
        """Cut the file back to ``size`` bytes (the state before the last
        append), after a write that must not count. Marks the journal
        :attr:`broken` if even that fails, and raises."""
        try:
            if self._fd is not None:
                os.ftruncate(self._fd, size)
            else:
                os.truncate(self.path, size)
        except OSError as e:
            self.broken = f"a write could not be undone ({e})"
            raise
        self.size = size
        self.count = count
        self.first_ts = first_ts

    def sync(self) -> None:
        """fsync the file if anything was written since the last one. Blocking.

        May run in a thread while the owner appends on the loop: the flag is
        cleared before the fsync, so a write that races it is synced next
        time. A failed fsync marks the journal :attr:`broken` (after one, the
        kernel may have dropped the dirty pages: nothing written since is
        known to be durable) and raises.
        """
        if not self.dirty:
            return
        self.dirty = False
        try:
            # Through a descriptor of its own (fsync is per file, not per
            # descriptor): the append descriptor belongs to the event loop,
            # which may close it at any time to bound open files.
            tmp = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(tmp)
            finally:
                os.close(tmp)
        except OSError as e:
            self.broken = f"fsync failed: {e}"
            raise

    def rewrite(
        self, epoch: str, base: int, parts: list[bytes], count: int, first_ts: float | None
    ) -> None:
        """Replace the file by a header and ``count`` events after ``base``.

        ``parts`` are the events' encoded records (or their pieces, in order).

        Used to create the file and to compact it. Blocking (run it in a
        thread): writes a temp file, fsyncs it, renames it over the journal
        and fsyncs the directory; the next append reopens it. The caller
        closes the journal first, on the event loop (the append descriptor
        is the loop's alone, see :meth:`sync`). On failure the temp file is
        removed and the old file is left as it was.
        """
        if self._fd is not None:
            raise RuntimeError("close the journal (on the event loop) before rewriting it")
        tmp = self.path.with_name(self.path.name + TMP_SUFFIX)
        data = b"".join([header_record(self.gid, epoch, base, self.gen), *parts])
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError:
            # A full disk must not leave a temp file per guild behind: the
            # journal itself is untouched, and the next rewrite starts over.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        self.size = len(data)
        self.count = count
        self.first_ts = first_ts if count else None
        self.dirty = False
        _fsync_dir(self.path.parent)

    def close(self) -> None:
        """Release the file descriptor; a later append reopens it."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
