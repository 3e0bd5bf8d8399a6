"""Disk broker: single-node sequencing with durable history (``--data-dir``).

The memory broker's job (per guild: epoch, last ``s``, bounded history, the
live feed to this node's guild actor) plus one append-only journal file per
guild (``guildcast.core.journal``), so a restarted node continues every
guild's ``s`` and epoch and clients recover across the restart (docs/DESIGN.md,
"Durability").

Composed, not inherited: each guild's log is the memory broker's
``GuildLog`` (epoch, last ``s``, the history ring of ``broker/history.py``)
with its ``Journal``; listeners, feed and presence are a ``LocalFeed``
(``broker/local.py``), as in the memory broker.

Writer: a guild's records are appended only by that guild's actor (its
task is the only caller of :meth:`append` for its guild: one write per
mailbox batch). A per-guild lock still serialises appends, so any other
caller (tests, tools) cannot interleave records or feed out of order.

Order of one append: assign ``s`` -> one ``write`` of the whole batch ->
(``always``: fsync) -> history -> feed -> reply. Nothing is fanned out or
acknowledged before it is in the file, so a crash can only lose events
nobody saw; the fsync policy says what a power failure can lose:

- ``always``: nothing acknowledged (fsync before every reply; concurrent
  publishes to a guild queue in its mailbox meanwhile and share the next
  fsync).
- ``interval`` (default): at most the last ``fsync_interval`` seconds.
- ``never``: whatever the kernel had not yet written back (typically up to
  30 s on Linux).

A crash of the process alone (kill -9) loses nothing written, under any
policy: the page cache survives it.

Power failures: ``DIR/node.json`` records each run (its generation, the
machine's boot id, the policy, and whether it stopped cleanly with its
journals fsynced). A start that finds the last run unclean, under
``interval`` or ``never``, on a machine that has rebooted since, cannot
know what the lost page cache held: it raises the *reset generation*, and
every journal whose header is older gets a new epoch when it is loaded
(clients reload instead of ever being told a reused ``s``). A kill -9 (same
boot) keeps every epoch. ``DIR/lock`` is held while the broker runs: one
node per data directory.

Lost tails: after each journal write, before anything of it is fanned
out or acknowledged, the guild's high-water mark goes to ``DIR/marks.log``
(``guildcast.core.marks``, which holds the argument); a journal loaded
below its mark lost events clients may have seen and gets a new epoch. A
data dir restored from a copy is marked by the operator (``DIR/RESTORED``):
the start raises the reset generation as after a power failure.

Bounds: open journal files are capped at ``max_open``, strictly (least
recently written are closed and reopened on demand; only the event loop
uses an append descriptor, fsyncs in threads open their own); guild logs in
memory are capped at ``max_cached`` (least recently used, idle ones are
dropped and reloaded from their file on next use); their history by count,
age and bytes (``guildcast.broker.histbudget``). Files are compacted to the
history limits when they pass twice the count limit (plus
``COMPACT_SLACK``) or hold events the age limit has dropped for a while; a
journal untouched for ``history_ttl`` + ``JANITOR_GRACE`` is deleted (its
history has aged out entirely).

Failures: a refused write answers "unavailable" (nothing unwritten is
acknowledged), logs at most one line per kind every few seconds, and makes
the broker unhealthy (``/readyz`` 503, "cannot persist") until a write or
the syncer's probe succeeds. A failed rewrite removes its temp file; a start
removes any a crash left.

Idempotency keys (``append_keyed``): looked up in the node's window
(``guildcast.core.idempotency``) under the guild's lock, written with their
events (``F`` records, ``guildcast.core.journal``) in the batch's one
write, added to the window once written; a compaction writes the window out
(``K`` records) and a load puts the keys of a kept epoch back, so a retry
after a kill -9 and restart still gets the original ``s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

from guildcast.broker.base import (
    Broker,
    BrokerUnavailable,
    ExplainsHealth,
    Feed,
    LocalLog,
    Presence,
    PresenceFeed,
    PresenceSnapshot,
    Record,
    ReportsMetrics,
    Sweeps,
    spawn,
)
from guildcast.broker.histbudget import HistoryBudget
from guildcast.broker.history import History
from guildcast.broker.local import LocalFeed
from guildcast.broker.memory import HISTORY_GUILD_BYTES, HISTORY_NODE_BYTES, GuildLog
from guildcast.core import journal
from guildcast.core.idempotency import KeyWindows, Replayed, Seen, settle
from guildcast.core.journal import (
    FSYNC_POLICIES,
    TMP_SUFFIX,
    Journal,
    Loaded,
    event_prefix,
    key_record,
    keyed_event_prefix,
)
from guildcast.core.marks import Marks
from guildcast.core.metrics import MetricsSnapshot
from guildcast.core.ratelog import RateLimitedLog
from guildcast.protocol import wire

log = logging.getLogger("guildcast.journal")
#: Write failures come in floods on a full disk (one per publish): one line
#: per kind every few seconds, with a count of the ones left out.
rlog = RateLimitedLog(log)

#: Journal files kept open at once: one per recently written guild. Far below
#: the usual descriptor limit, which the gateway's connections need.
MAX_OPEN_JOURNALS = 512
#: Guild logs (epoch, head, history) kept in memory; others reload on use.
MAX_CACHED_GUILDS = 10_000
#: Events a journal may hold past twice the history size before compaction:
#: keeps tiny histories (or none) from rewriting their file on every event.
COMPACT_SLACK = 256
#: Shortest age past which events dropped by the age bound trigger a
#: rewrite (seconds): at most one age-driven rewrite per guild per minute.
COMPACT_MIN_AGE = 60.0
#: Threads that fsync journals at once at a stop (``close``): the filesystem
#: commits concurrent fsyncs together, so 1,000 dirty journals (a full node's
#: stop) took 0.2 s on 8 threads against 0.5-1.9 s one after another on the
#: bench machine's ext4.
SYNC_THREADS = 8
#: Fewest journals a sync hands each thread (a few are fsynced on one).
SYNC_CHUNK = 16
#: The subdirectory of ``--data-dir`` that holds the journals.
GUILDS_DIR = "guilds"
#: The run record and the lock file, in ``--data-dir``.
STATE_FILE = "node.json"
LOCK_FILE = "lock"
#: Created by an operator after restoring ``--data-dir`` from a copy
#: (docs/OPERATIONS.md, "Backups and restore"): the next start gives every
#: guild a new epoch, then removes it.
RESTORED_FILE = "RESTORED"
#: Seconds between two probes of a data dir that refused a write: readiness
#: comes back once a probe (a small file written and fsynced) succeeds.
PROBE_INTERVAL = 1.0
#: Bytes the probe writes: a page, so a disk with no block left fails it.
PROBE_BYTES = 4096
#: Journal files the janitor looks at per syncer tick (about a second): a
#: 100,000-guild directory is visited in under 7 minutes, at a cost of one
#: ``stat`` per file on the loop.
JANITOR_BATCH = 256
#: Seconds past ``history_ttl`` a journal must be untouched before the
#: janitor deletes it: its last event left the history that long ago.
JANITOR_GRACE = 60.0
#: Changes on every boot of a Linux machine; elsewhere every unclean stop
#: counts as a possible power failure.
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class _GuildLog:
    """A guild's memory log and its journal."""

    __slots__ = ("busy", "journal", "lock", "log")

    def __init__(self, log: GuildLog, j: Journal) -> None:
        #: Epoch, last ``s`` and history (its bytes are 0 in the budget until
        #: the loop has counted a log loaded in a thread).
        self.log = log
        self.journal = j
        #: Serialises writes to the journal (append, compaction).
        self.lock = asyncio.Lock()
        #: Operations in flight (an append, an fsync in a thread): while >0
        #: the log is neither evicted nor its file closed.
        self.busy = 0


class DiskBroker:
    """Broker for a single node whose history survives restarts.

    The memory broker's parts (a ``GuildLog`` per guild, a ``LocalFeed``)
    with a journal under each guild log.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        history_size: int,
        history_ttl: float,
        fsync: str = "interval",
        fsync_interval: float = 1.0,
        max_open: int = MAX_OPEN_JOURNALS,
        max_cached: int = MAX_CACHED_GUILDS,
        history_guild_bytes: int = HISTORY_GUILD_BYTES,
        history_node_bytes: int = HISTORY_NODE_BYTES,
        idempotency: KeyWindows | None = None,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {', '.join(FSYNC_POLICIES)}")
        if fsync_interval <= 0:
            raise ValueError("fsync_interval must be > 0")
        #: This node's name in presence (the node sets ``--node-id``).
        self.node_id = "local"
        self.history_size = history_size
        self.history_ttl = history_ttl
        self.budget = HistoryBudget(history_guild_bytes, history_node_bytes)
        #: The idempotency window of every guild (``append_keyed``).
        self.keys = idempotency if idempotency is not None else KeyWindows()
        self.local = LocalFeed()
        self.directory = Path(directory) / GUILDS_DIR
        self.root = Path(directory)
        #: This run's generation, and the one below which journal epochs
        #: are not trusted (see the module docstring).
        self.generation = 0
        self.reset_generation = 0
        self._lock_fd: int | None = None
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.max_open = max_open
        self.max_cached = max_cached
        self._glogs: OrderedDict[str, _GuildLog] = OrderedDict()
        self._loading: dict[str, asyncio.Future[_GuildLog]] = {}
        #: Guilds whose journal holds a file descriptor, least recently written first.
        self._open: OrderedDict[str, None] = OrderedDict()
        self._syncer: asyncio.Task[None] | None = None
        #: The fsync threads (``sync_all``), started on first use.
        self._sync_pool: ThreadPoolExecutor | None = None
        #: Why the data dir cannot persist right now (the last write failure),
        #: or None; readiness is false while set (``/readyz``).
        self.persist_error: str | None = None
        self.marks = Marks(self.root)
        self._marks_syncing = False
        self._janitor: Iterator[os.DirEntry[str]] | None = None
        #: Journals of guilds whose whole history aged out, deleted.
        self.journals_deleted = 0
        #: Counters for ``/metrics``.
        self.bytes_written = 0
        self.fsyncs = 0
        self.repairs = 0
        self.write_failures = 0
        #: Journals found cut below their high-water mark (new epoch).
        self.cuts = 0

    @property
    def healthy(self) -> bool:
        return self.persist_error is None

    async def start(self, tg: asyncio.TaskGroup | None = None) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            suspect = await asyncio.to_thread(self._begin)
        except OSError as e:
            raise BrokerUnavailable(f"cannot use data dir {self.root}: {e}") from e
        if suspect == "restored":
            log.warning(
                "%s found in %s: the data dir was restored from a copy; each guild starts "
                "a new epoch when it is loaded",
                RESTORED_FILE,
                self.root,
                extra={"data_dir": str(self.root), "generation": self.generation},
            )
        elif suspect:
            log.warning(
                "the machine restarted while the last run used --fsync %s and did not stop "
                "cleanly: acknowledged events may be lost; each guild starts a new epoch "
                "when it is loaded",
                suspect,
                extra={"data_dir": str(self.root), "generation": self.generation},
            )
        # In the node's task group; cancelled and awaited in close(). It
        # fsyncs (``interval``), fsyncs the marks, and probes a data dir that
        # refused a write.
        self._syncer = spawn(tg, self._sync_loop(), "journal-syncer")

    async def close(self) -> None:
        """Stop the syncer, fsync what is pending (unless ``never``) and close files."""
        if self._syncer is not None:
            self._syncer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._syncer
            self._syncer = None
        self.local.clear()
        if self.fsync != "never":
            await self.sync_all(SYNC_THREADS)
            # Before the clean stop is recorded: a backup of a stopped node
            # holds its marks (docs/OPERATIONS.md, "Backups and restore").
            try:
                await asyncio.to_thread(self.marks.sync)
            except OSError as e:
                self._storage_failed("(marks)", e)
        for lg in self._glogs.values():
            lg.journal.close()
        self._open.clear()
        if self._sync_pool is not None:
            # Waits for a sync a cancelled syncer left running, before the
            # clean stop is recorded.
            await asyncio.to_thread(self._sync_pool.shutdown, True)
            self._sync_pool = None
        await asyncio.to_thread(self._end)
        self.marks.close()
        if self._janitor is not None:
            close = getattr(self._janitor, "close", None)  # a scandir iterator holds a descriptor
            if close is not None:
                close()
            self._janitor = None

    def _begin(self) -> str | None:
        """Lock the data dir, read the last run's record, record this run.

        Returns the last run's fsync policy if it may have lost acknowledged
        events to a power failure, else None. Blocking: runs in a thread.
        """
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(f"{self.root} is in use by another node") from None
        self._lock_fd = fd
        prev = _read_state(self.root / STATE_FILE)
        boot = _boot_id()
        self.generation = int(prev.get("generation", 0)) + 1
        self.reset_generation = int(prev.get("reset_generation", 0))
        suspect: str | None = None
        if (
            prev
            and not prev.get("clean")
            and prev.get("fsync") != "always"
            and (boot is None or prev.get("boot_id") != boot)
        ):
            suspect = str(prev.get("fsync"))
            self.reset_generation = self.generation
        restored = self.root / RESTORED_FILE
        if restored.exists():
            suspect = "restored"
            self.reset_generation = self.generation
        self._remove_temp_files()
        self._write_state(clean=False, boot=boot)
        # Only once the new reset generation is durable: a crash before this
        # leaves the marker, and the next start resets again.
        with contextlib.suppress(FileNotFoundError):
            restored.unlink()
        marks_existed = self.marks.open()
        if not marks_existed and prev:
            log.warning(
                "%s has no %s (a node older than the high-water marks, or a partial "
                "restore): journals cut before this start cannot be detected",
                self.root,
                self.marks.path.name,
                extra={"data_dir": str(self.root)},
            )
        return suspect

    def _remove_temp_files(self) -> int:
        """Delete temp files a crash left in the data dir (blocking)."""
        removed = 0
        for d in (self.root, self.directory):
            for entry in os.scandir(d):
                if entry.name.endswith(TMP_SUFFIX) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
        if removed:
            log.info("removed %d temporary files left in %s", removed, self.root)
        return removed

    def _end(self) -> None:
        """Record a clean stop (journals fsynced) and release the lock."""
        try:
            if self.fsync != "never":
                self._write_state(clean=True, boot=_boot_id())
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _write_state(self, clean: bool, boot: str | None) -> None:
        state = {
            "generation": self.generation,
            "reset_generation": self.reset_generation,
            "clean": clean,
            "fsync": self.fsync,
            "boot_id": boot,
        }
        path = self.root / STATE_FILE
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(wire.encode(state))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(self.root, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # --- the contract --------------------------------------------------------

    async def append(self, gid: str, items: Sequence[tuple[str, bytes]]) -> tuple[str, list[int]]:
        epoch, recs = await self._locked_append(gid, items, True)
        return epoch, [r.s for r in recs]

    async def append_local(
        self, gid: str, items: Sequence[tuple[str, bytes]]
    ) -> tuple[str, list[Record]]:
        """``LocalLog``: the records go back to the appender, not to the feed."""
        return await self._locked_append(gid, items, False)

    async def _locked_append(
        self, gid: str, items: Sequence[tuple[str, bytes]], feed: bool
    ) -> tuple[str, list[Record]]:
        lg = await self._get(gid)
        lg.busy += 1
        try:
            async with lg.lock:
                return await self._append(gid, lg, items, feed)
        finally:
            lg.busy -= 1

    def _new_log(self, epoch: str, seq: int, j: Journal) -> _GuildLog:
        history = History(self.history_size, self.history_ttl, self.budget)
        return _GuildLog(GuildLog(epoch, seq, history), j)

    async def append_keyed(
        self, gid: str, items: Sequence[tuple[str, bytes]], keys: Sequence[str | None]
    ) -> tuple[str, list[int | Replayed]]:
        epoch, _, out = await self._locked_append_keyed(gid, items, keys, True)
        return epoch, out

    async def append_local_keyed(
        self, gid: str, items: Sequence[tuple[str, bytes]], keys: Sequence[str | None]
    ) -> tuple[str, list[Record], list[int | Replayed]]:
        """``LocalLog``: keyed, the new records back to the appender."""
        return await self._locked_append_keyed(gid, items, keys, False)

    async def _locked_append_keyed(
        self,
        gid: str,
        items: Sequence[tuple[str, bytes]],
        keys: Sequence[str | None],
        feed: bool,
    ) -> tuple[str, list[Record], list[int | Replayed]]:
        """Under the guild's lock: look the keys up in the window, write the
        new events with their keys (``F`` records), answer the rest with
        the originals (docs/PROTOCOL.md "Idempotent publish")."""
        lg = await self._get(gid)
        lg.busy += 1
        try:
            async with lg.lock:
                window = self.keys
                epoch = lg.log.epoch
                fresh, replayed, digests = window.resolve(gid, epoch, items, keys, time.time())
                tags: list[tuple[str, bytes] | None] = []
                for i in fresh:
                    key, dg = keys[i], digests[i]
                    tags.append((key, dg) if key is not None and dg is not None else None)
                sel = [items[i] for i in fresh]
                epoch, recs = await self._append(gid, lg, sel, feed, tags)
                return epoch, recs, settle(fresh, [r.s for r in recs], replayed)
        finally:
            lg.busy -= 1

    async def _append(
        self,
        gid: str,
        lg: _GuildLog,
        items: Sequence[tuple[str, bytes]],
        feed: bool,
        tags: Sequence[tuple[str, bytes] | None] | None = None,
    ) -> tuple[str, list[Record]]:
        """Write ``items`` (with the idempotency key and digest in ``tags``,
        if any) to the journal, then history, feed, reply."""
        now = time.time()
        glog = lg.log
        recs = glog.next_records(gid, items, now)
        parts: list[bytes] = []
        for i, r in enumerate(recs):
            tag = tags[i] if tags is not None else None
            if tag is None:
                parts.append(event_prefix(r.s, r.t, now, r.payload))
            else:
                parts.append(keyed_event_prefix(r.s, r.t, now, tag[0], tag[1], r.payload))
            parts.append(r.payload)
        if not recs:
            return glog.epoch, recs
        s = recs[-1].s
        j = lg.journal
        created = not j.exists
        before = (j.size, j.count, j.first_ts)
        try:
            if created:
                # The first event of this guild's file: create it whole, header first.
                await asyncio.to_thread(j.rewrite, glog.epoch, glog.seq, parts, len(recs), now)
                self.fsyncs += 1
            else:
                data = b"".join(parts)
                j.append(data, len(recs), now)
                self._opened(gid)
        except OSError as e:
            self._storage_failed(gid, e)
            raise BrokerUnavailable(f"cannot write the journal of {gid}: {e}") from e
        try:
            # The high-water mark, after the records and before anything of
            # them leaves the node (guildcast.core.marks: the proof).
            self.marks.set(gid, glog.epoch, s)
        except OSError as e:
            self._undo(gid, lg, created, before)
            self._storage_failed(gid, e)
            raise BrokerUnavailable(f"cannot write the high-water mark of {gid}: {e}") from e
        self.persist_error = None
        self.bytes_written += sum(len(p) for p in parts)
        glog.commit(recs, now)
        self._enforce_budget()
        if tags is not None:
            # Before a compaction below, which writes the window out.
            for rec, tag in zip(recs, tags, strict=True):
                if tag is not None:
                    self.keys.add(gid, tag[0], Seen(rec.s, glog.epoch, tag[1], now))
        if self.fsync == "always":
            try:
                await asyncio.to_thread(j.sync)
            except OSError as e:
                # The events are in the file but not known to be durable: do
                # not acknowledge them (publishers may retry; at least once).
                self._storage_failed(gid, e)
                raise BrokerUnavailable(f"cannot fsync the journal of {gid}: {e}") from e
            self.fsyncs += 1
        if feed:
            self.local.records(gid, recs)
        await self._maybe_compact(gid, lg, now)
        return glog.epoch, recs

    def _undo(
        self, gid: str, lg: _GuildLog, created: bool, before: tuple[int, int, float | None]
    ) -> None:
        """Take back a journal write whose mark could not be written: events
        that are not marked must not be in the file (their ``s`` is reused)."""
        j = lg.journal
        try:
            if created:
                j.close()
                os.unlink(j.path)
                j.size, j.count, j.first_ts = 0, 0, None
            else:
                j.undo(*before)
        except OSError as e:
            # The events stay in the file, unmarked: the journal refuses every
            # write until a restart, whose load sees them (and keeps them:
            # nobody was told their s, and the next s follows them).
            j.broken = f"an unmarked write could not be undone ({e})"

    @property
    def unhealthy_reason(self) -> str:
        """``ExplainsHealth``: "cannot persist to DIR: No space left ..." or ""."""
        return self.persist_error or ""

    def report_metrics(self, m: MetricsSnapshot) -> None:
        """``ReportsMetrics``: the history budget and the journals."""
        m.history_bytes = self.budget.total
        m.history_evictions = self.budget.evicted
        m.journal_bytes = self.bytes_written
        m.journal_fsyncs = self.fsyncs
        m.journal_repairs = self.repairs
        m.journal_write_failures = self.write_failures
        m.journal_cuts = self.cuts
        m.journal_open_files = len(self._open)
        m.journals_deleted = self.journals_deleted

    def sweep(self) -> int:
        """``Sweeps``: nothing else to sweep (idle guild logs leave memory by
        themselves, LRU); expired idempotency keys leave the window."""
        self.keys.expire(time.time())
        return 0

    async def head(self, gid: str) -> tuple[str, int]:
        glog = (await self._get(gid)).log
        return glog.epoch, glog.seq

    async def read(self, gid: str, after: int, limit: int) -> tuple[str, list[Record]]:
        glog = (await self._get(gid)).log
        return glog.epoch, glog.history.read(after, limit, time.time())

    async def first(self, gid: str) -> int | None:
        return (await self._get(gid)).log.history.first(time.time())

    async def listen(self, gid: str) -> None:
        await self._get(gid)
        self.local.listen(gid)

    async def unlisten(self, gid: str) -> None:
        self.local.unlisten(gid)

    def set_feed(self, feed: Feed, presence: PresenceFeed | None = None) -> None:
        self.local.set_feed(feed, presence)

    def presence_join(self, gid: str, member: Presence) -> None:
        self.local.join(gid, member)

    def presence_leave(self, gid: str, member: Presence) -> None:
        self.local.leave(gid, member)

    async def presence(self, gid: str) -> list[Presence]:
        return self.local.members(gid)

    async def presence_snapshot(self, gid: str, limit: int) -> PresenceSnapshot:
        return self.local.snapshot(gid, limit)

    # --- loading and caching ---------------------------------------------------

    async def _get(self, gid: str) -> _GuildLog:
        cached = self._glogs.get(gid)
        if cached is not None:
            self._glogs.move_to_end(gid)
            return cached
        pending = self._loading.get(gid)
        if pending is not None:
            return await asyncio.shield(pending)
        path = journal.journal_path(self.directory, gid)
        # One stat (the directory is hot in the dentry cache) instead of a
        # thread hop for every new guild; its file appears with its first event.
        if not os.path.exists(path):  # noqa: ASYNC240
            j = Journal(path, gid, self.generation)
            lg = self._new_log(secrets.token_hex(8), 0, j)
            self._cache(gid, lg)
            return lg
        fut: asyncio.Future[_GuildLog] = asyncio.get_running_loop().create_future()
        self._loading[gid] = fut
        try:
            loaded, lg, reset = await asyncio.to_thread(self._load, path, gid)
        except OSError as e:
            exc = BrokerUnavailable(f"cannot read the journal of {gid}: {e}")
            fut.set_exception(exc)
            fut.exception()  # retrieved: concurrent waiters get it, nobody else must
            raise exc from e
        finally:
            del self._loading[gid]
        if loaded.repair is not None:
            self.repairs += 1
            if "high-water mark" in loaded.repair:
                self.cuts += 1
            log.warning(
                "journal of guild %s repaired: %s%s",
                gid,
                loaded.repair,
                "; history lost, new epoch" if loaded.lost else "",
                extra={"guild": gid, "path": str(path), "new_epoch": loaded.lost},
            )
        if reset:
            log.warning(
                "guild %s: new epoch: its journal predates a possible power failure or a restore",
                gid,
                extra={"guild": gid, "path": str(path), "new_epoch": True},
            )
        glog = lg.log
        if glog.epoch != loaded.epoch or gid not in self.marks.table:
            # The new epoch's (or a pre-marks journal's) mark; written on the
            # loop, the marks' only writer. Failing, the next append writes it.
            with contextlib.suppress(OSError):
                self.marks.set(gid, glog.epoch, glog.seq)
        self._cache(gid, lg)
        glog.history.count_restored()
        self._enforce_budget()
        if glog.epoch == loaded.epoch:
            self._restore_keys(gid, glog, loaded)
        fut.set_result(lg)
        return lg

    def _restore_keys(self, gid: str, lg: GuildLog, loaded: Loaded) -> None:
        """Put the idempotency keys a journal holds back in the window (a
        restart keeps answering retries with the originals); keys of an
        epoch that was not kept are gone with its history."""
        now = time.time()
        for k in loaded.keys:
            if k.s <= lg.seq:
                self.keys.restore(gid, k.key, Seen(k.s, lg.epoch, k.digest, k.ts), now)

    def _load(self, path: Path, gid: str) -> tuple[Loaded, _GuildLog, bool]:
        """Read (and repair) one journal; True if a possible power failure
        (not damage) forced a new epoch. Runs in a thread."""
        loaded = journal.load(path, gid, keep=self.history_size)
        j = Journal(path, gid, self.generation)
        now = time.time()
        reset = loaded.epoch is not None and not loaded.lost and loaded.gen < self.reset_generation
        cut = None if reset else _cut(loaded, self.marks.get(gid))
        if cut is not None:
            loaded.lost = True
            loaded.repair = f"{loaded.repair}; {cut}" if loaded.repair else cut
        if loaded.epoch is None or loaded.lost or reset:
            # History lost: a new epoch; keep the intact events under it.
            lg = self._new_log(secrets.token_hex(8), loaded.head, j)
        else:
            lg = self._new_log(loaded.epoch, loaded.head, j)
            j.adopt(loaded)
        # Not counted by the budget yet (this is a thread): _get counts it.
        history = lg.log.history
        history.restore((Record(e.s, e.t, e.ts, e.payload) for e in loaded.events), now)
        if (loaded.lost or reset) and loaded.epoch is not None:
            base, parts, first_ts = self._snapshot(lg)
            j.rewrite(lg.log.epoch, base, parts, len(history), first_ts)
        return loaded, lg, reset

    def _cache(self, gid: str, lg: _GuildLog) -> None:
        self._glogs[gid] = lg
        if len(self._glogs) <= self.max_cached:
            return
        # Drop the least recently used logs that nothing is using; their
        # state is in their file (data written is readable without fsync).
        for old in list(islice(self._glogs, len(self._glogs) - self.max_cached + 8)):
            if len(self._glogs) <= self.max_cached:
                break
            cand = self._glogs[old]
            if (
                old == gid
                or cand.busy
                or cand.lock.locked()
                or (cand.journal.dirty and self.fsync != "never")  # fsync first
                or self.local.listening(old)
            ):
                continue
            cand.journal.close()
            self._open.pop(old, None)
            self.budget.dropped(cand.log.history)
            del self._glogs[old]

    def _opened(self, gid: str) -> None:
        """``gid``'s journal holds a descriptor: keep at most ``max_open`` of them."""
        self._open[gid] = None
        self._open.move_to_end(gid)
        # Oldest first, none skipped: the bound is strict. Closing is safe at
        # any time because only the event loop uses an append descriptor
        # (fsyncs in threads open their own, rewrites run closed:
        # guildcast.core.journal). Skipping journals "in use" is what let an
        # fsync round of the syncer, which held every dirty journal busy,
        # push the open descriptors past the bound (issue "Hardening 2").
        while len(self._open) > self.max_open:
            old, _ = self._open.popitem(last=False)
            cand = self._glogs.get(old)
            if cand is not None:
                cand.journal.close()

    # --- durability --------------------------------------------------------------

    def _enforce_budget(self) -> None:
        """The node's history byte bound, across every cached guild log."""
        budget = self.budget
        if budget.over:
            budget.enforce(lg.log.history for lg in self._glogs.values())

    def _snapshot(self, lg: _GuildLog) -> tuple[int, list[bytes], float | None]:
        """The base, encoded records and first time of ``lg``'s history."""
        parts: list[bytes] = []
        records = lg.log.history.records
        for r in records:
            parts.append(event_prefix(r.s, r.t, r.ts, r.payload))
            parts.append(r.payload)
        if records:
            return records[0].s - 1, parts, records[0].ts
        return lg.log.seq, parts, None

    async def _maybe_compact(self, gid: str, lg: _GuildLog, now: float) -> None:
        """Rewrite the journal down to the history when it has grown past it."""
        j = lg.journal
        kept = len(lg.log.history) if self.history_size > 0 else 0
        too_many = j.count > 2 * self.history_size + COMPACT_SLACK
        too_old = (
            j.count > kept
            and j.first_ts is not None
            and j.first_ts < now - max(2 * self.history_ttl, COMPACT_MIN_AGE)
        )
        if not (too_many or too_old):
            return
        if self.history_size <= 0:
            lg.log.history.clear()
        base, parts, first_ts = self._snapshot(lg)
        # The window's keys first: they outlive the events a compaction drops.
        parts[:0] = [
            key_record(seen.s, seen.ts, key, seen.digest)
            for key, seen in self.keys.entries(gid, lg.log.epoch, now)
        ]
        j.close()  # on the loop, the only user of the append descriptor
        self._open.pop(gid, None)
        try:
            await asyncio.to_thread(j.rewrite, lg.log.epoch, base, parts, kept, first_ts)
        except OSError as e:
            # The old file is still whole and appendable: try again next time.
            self.write_failures += 1
            rlog.log(
                logging.ERROR,
                "journal-compaction-failed",
                "guild %s: journal compaction failed: %s",
                gid,
                e,
                extra={"guild": gid},
            )
            return
        self.fsyncs += 1

    def _storage_failed(self, gid: str, e: OSError) -> None:
        """A write was refused: not ready until a write or a probe succeeds;
        one ERROR line per interval however many fail (a full disk fails
        every publish)."""
        self.write_failures += 1
        self.persist_error = f"cannot persist to {self.root}: {e.strerror or e}"
        rlog.log(
            logging.ERROR,
            "journal-write-failed",
            "guild %s: journal write failed: %s",
            gid,
            e,
            extra={"guild": gid},
        )

    async def sync_all(self, threads: int = 1) -> int:
        """fsync every journal written since its last fsync; returns how many.
        ``threads`` > 1 (the stop: ``close``) fsyncs slices of them at once,
        each thread through a descriptor of its own; the interval syncer
        keeps to one thread (one descriptor past ``max_open``)."""
        dirty = [lg for lg in self._glogs.values() if lg.journal.dirty]
        if not dirty:
            return 0
        for lg in dirty:
            lg.busy += 1
        journals = [lg.journal for lg in dirty]
        try:
            # Up to SYNC_THREADS threads at once, each a slice of them.
            k = max(1, min(threads, len(journals) // SYNC_CHUNK))
            if k == 1:
                done = await asyncio.to_thread(_sync_many, journals)
            else:
                pool = self._sync_pool
                if pool is None:
                    pool = self._sync_pool = ThreadPoolExecutor(
                        k, thread_name_prefix="journal-fsync"
                    )
                loop = asyncio.get_running_loop()
                parts = await asyncio.gather(
                    *(loop.run_in_executor(pool, _sync_many, journals[i::k]) for i in range(k))
                )
                done = sum(parts)
        finally:
            for lg in dirty:
                lg.busy -= 1
        self.fsyncs += done
        return done

    async def _sync_loop(self) -> None:
        tick = min(self.fsync_interval, PROBE_INTERVAL)
        last = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            try:
                now = time.monotonic()
                if self.fsync == "interval" and now - last >= self.fsync_interval - tick / 2:
                    last = now
                    await self.sync_all()
                if self.fsync != "never":
                    await self._sync_marks()
                if self.marks.needs_compaction and not self._marks_syncing:
                    await self._compact_marks()
                if self.persist_error is not None:
                    await self._probe()
                else:
                    self._sweep_journals(time.time())
            except Exception:
                log.exception("journal syncer failed")

    async def _sync_marks(self) -> None:
        self._marks_syncing = True
        try:
            await asyncio.to_thread(self.marks.sync)
        except OSError as e:
            self._storage_failed("(marks)", e)
        finally:
            self._marks_syncing = False

    def _sweep_journals(self, now: float) -> int:
        """Delete up to :data:`JANITOR_BATCH` files' worth of journals whose
        whole history has aged out; returns how many were deleted.

        A journal untouched for ``history_ttl + JANITOR_GRACE`` holds only
        events past the age bound: nothing in it can be recovered, so the
        guild is forgotten as the memory broker forgets it (its next event
        starts a new epoch at s=1, which PROTOCOL.md asks when history is
        lost). Runs on the loop, so no load or append of that guild can
        interleave; guilds cached, loading or listened to are left alone.
        """
        if self._janitor is None:
            try:
                self._janitor = os.scandir(self.directory)
            except OSError:
                return 0
        cutoff = now - self.history_ttl - JANITOR_GRACE
        deleted = 0
        for _ in range(JANITOR_BATCH):
            entry = next(self._janitor, None)
            if entry is None:
                self._janitor = None
                break
            gid = journal.guild_of(entry.name)
            if (
                gid is None
                or gid in self._glogs
                or gid in self._loading
                or self.local.listening(gid)
            ):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                    continue
                os.unlink(entry.path)
            except OSError:
                continue
            deleted += 1
            self.keys.forget(gid)
            with contextlib.suppress(OSError):
                self.marks.forget(gid)
        self.journals_deleted += deleted
        if deleted:
            log.info("deleted %d journals whose history aged out", deleted)
        return deleted

    async def _compact_marks(self) -> None:
        """Rewrite ``marks.log`` from the table, its bulk in a thread."""
        snapshot = self.marks.begin_compaction()
        size: int | None = None
        try:
            size = await asyncio.to_thread(self.marks.write_snapshot, snapshot)
        except OSError as e:
            self._storage_failed("(marks)", e)
        finally:
            self.marks.finish_compaction(size)

    async def _probe(self) -> None:
        """Write, fsync and remove a small file: readiness returns if it works."""
        try:
            await asyncio.to_thread(_probe_write, self.root / f"probe{TMP_SUFFIX}")
        except OSError as e:
            self.persist_error = f"cannot persist to {self.root}: {e.strerror or e}"
            return
        log.info("data dir %s takes writes again", self.root, extra={"data_dir": str(self.root)})
        self.persist_error = None


def _sync_many(journals: list[Journal]) -> int:
    """fsync each journal (in a thread); a failure is logged and marks that one broken."""
    done = 0
    for j in journals:
        try:
            j.sync()
            done += 1
        except OSError as e:
            rlog.log(
                logging.ERROR,
                "journal-fsync-failed",
                "guild %s: journal fsync failed: %s",
                j.gid,
                e,
                extra={"guild": j.gid},
            )
    return done


def _probe_write(path: Path) -> None:
    try:
        with open(path, "wb") as f:
            f.write(b"\0" * PROBE_BYTES)
            f.flush()
            os.fsync(f.fileno())
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _cut(loaded: Loaded, mark: tuple[str, int] | None) -> str | None:
    """Why ``loaded`` lost records its high-water mark says were written, or
    None (guildcast.core.marks has the argument)."""
    if mark is None or loaded.epoch is None:
        return None
    epoch, s = mark
    if epoch != loaded.epoch:
        return f"the journal's epoch {loaded.epoch} is not its high-water mark's ({epoch})"
    if loaded.head < s:
        return (
            f"the journal ends at s={loaded.head} but its high-water mark is s={s}: "
            "its tail was lost (restored from an older copy, or dropped writes)"
        )
    return None


def _conforms() -> None:
    """mypy checks the implementation against the contract (docs/DESIGN.md house style)."""
    _: type[Broker] = DiskBroker
    _local: type[LocalLog] = DiskBroker
    _health: type[ExplainsHealth] = DiskBroker
    _report: type[ReportsMetrics] = DiskBroker
    _sweeps: type[Sweeps] = DiskBroker


def _boot_id() -> str | None:
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def _read_state(path: Path) -> dict[str, Any]:
    """The last run's record, or {} when there is none or it is unreadable."""
    try:
        state = wire.decode(path.read_bytes())
    except (OSError, wire.JSONDecodeError):
        return {}
    return state if isinstance(state, dict) else {}
