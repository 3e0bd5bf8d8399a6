"""Checking clients for fault injection: publishers that keep every ACK, subscribers
that keep every event with the epoch it was labelled with, and the ledger that
compares the two.

Used by the cluster fault tests (``tests/cluster/test_faults.py``) and the fault
harness (``guildcast.loadtest.faults``). Every published ``d`` is unique
(``{"k": "<publisher>-<n>"}``), so an event can be traced from its ACK
``(epoch, s)`` to every delivery.

Counts (:meth:`Ledger.tally`), per subscriber and guild:

- *lost*: an acknowledged event the subscriber was owed and never got. It is
  owed every event after the head it was given at each ``SUBSCRIBED`` that
  did not recover (the server saying "reload, what came before is not
  replayed"), up to the last one it got before the next such SUBSCRIBED, and
  after the last one every acknowledged event of that epoch; a subscriber
  not on the guild's newest epoch is owed all of the newest epoch's events;
- *doubled*: an event delivered more than once;
- *mislabelled*: an event delivered under an ``(epoch, s)`` other than the
  one its publisher was acknowledged with.

Bounds: each client keeps what it saw (a run is bounded by its publish count).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection

#: The ERROR code of a PUBLISH whose outcome is unknown (docs/PROTOCOL.md).
OUTCOME_UNKNOWN = 4504


async def send(ws: ClientConnection, op: int, d: Any) -> None:
    await ws.send(orjson.dumps({"op": op, "d": d}).decode())


@dataclass
class Subscriber:
    """Follows guilds across reconnects (round robin over ``urls``), recovering by
    Position; keeps ``(epoch, s, key)`` of every event."""

    urls: list[str]
    token: str
    guilds: list[str]
    #: Per guild: every delivered event as (epoch label, s, key).
    got: dict[str, list[tuple[str, int, str]]] = field(default_factory=dict)
    #: Per guild: the current epoch and the last s delivered in it.
    epoch: dict[str, str] = field(default_factory=dict)
    last: dict[str, int] = field(default_factory=dict)
    #: Per guild: the windows it was served, ``[epoch, head given, last s got]``;
    #: a new one at each SUBSCRIBED that did not recover.
    windows: dict[str, list[list[Any]]] = field(default_factory=dict)
    close_codes: list[int] = field(default_factory=list)
    reconnects: int = 0
    subscribed: asyncio.Event = field(default_factory=asyncio.Event)

    def keys(self, gid: str) -> set[str]:
        return {k for _, _, k in self.got.get(gid, ())}

    async def run(self) -> None:
        i = 0
        while True:
            url = self.urls[i % len(self.urls)]
            try:
                async with websockets.connect(url, open_timeout=10) as ws:
                    try:
                        await self._session(ws)
                    finally:
                        if ws.close_code is not None:
                            self.close_codes.append(ws.close_code)
            except (OSError, websockets.ConnectionClosed, websockets.InvalidHandshake):
                pass
            except TimeoutError:
                pass
            self.reconnects += 1
            i += 1
            await asyncio.sleep(0.05)

    async def _session(self, ws: ClientConnection) -> None:
        hello = orjson.loads(await ws.recv())
        interval = hello["d"]["heartbeat_interval"] / 1000.0
        positions = {
            g: ({"epoch": self.epoch[g], "s": self.last.get(g, 0)} if g in self.epoch else None)
            for g in self.guilds
        }
        await send(ws, 2, {"token": self.token, "guilds": positions})

        async def beat() -> None:
            while True:
                await asyncio.sleep(interval / 2)
                await send(ws, 1, None)

        hb = asyncio.create_task(beat())
        try:
            pending = set(self.guilds)
            async for raw in ws:
                m = orjson.loads(raw)
                if m["op"] != 0:
                    continue
                g = m.get("g")
                if m["t"] == "SUBSCRIBED":
                    d = m["d"]
                    if not d["recovered"] or d["epoch"] != self.epoch.get(g):
                        self.epoch[g] = d["epoch"]
                        self.last[g] = d["s"]
                        self.windows.setdefault(g, []).append([d["epoch"], d["s"], d["s"]])
                    pending.discard(g)
                    if not pending:
                        self.subscribed.set()
                elif "s" in m and isinstance(m["d"], dict) and "k" in m["d"]:
                    self.got.setdefault(g, []).append((self.epoch[g], m["s"], m["d"]["k"]))
                    self.last[g] = m["s"]
                    self.windows[g][-1][2] = m["s"]
        finally:
            hb.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await hb


class Publisher:
    """Publishes unique events over one gateway connection, one at a time (op 5,
    waiting for each ACK or ERROR); reconnects when the connection drops."""

    def __init__(self, urls: list[str], token: str, name: str) -> None:
        self.urls = urls
        self.token = token
        self.name = name
        self.n = 0
        #: key -> (guild, epoch, s) of every ACK, and when it came (monotonic).
        self.acked: dict[str, tuple[str, str, int]] = {}
        self.acked_at: dict[str, float] = {}
        #: ERROR codes of refused publishes (not published), by code; 0 for
        #: "no connection to send it on".
        self.refused: Counter[int] = Counter()
        #: Keys whose outcome is unknown (ERROR 4504 or a dropped connection).
        self.unknown: set[str] = set()
        self._ws: ClientConnection | None = None
        self._i = 0

    async def _connect(self) -> ClientConnection:
        url = self.urls[self._i % len(self.urls)]
        self._i += 1
        ws = await websockets.connect(url, open_timeout=10)
        await ws.recv()
        await send(ws, 2, {"token": self.token, "guilds": {}})
        ready = orjson.loads(await ws.recv())
        if ready.get("t") != "READY":
            await ws.close()
            raise ConnectionError(f"not READY: {ready}")
        return ws

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None

    async def publish(self, gid: str, timeout: float = 30.0) -> bool:
        """One event; True when acknowledged."""
        key = f"{self.name}-{self.n}"
        self.n += 1
        if self._ws is None:
            try:
                self._ws = await self._connect()
            except (OSError, websockets.WebSocketException, TimeoutError, ConnectionError):
                self.refused[0] += 1  # no connection: nothing was sent
                await asyncio.sleep(0.05)
                return False
        try:
            ws = self._ws
            await send(ws, 5, {"guild": gid, "t": "EV", "d": {"k": key}, "nonce": key})
            async with asyncio.timeout(timeout):
                while True:
                    m = orjson.loads(await ws.recv())
                    if m["op"] == 12 and m["d"].get("nonce") == key:
                        self.acked[key] = (gid, m["d"]["epoch"], int(m["d"]["s"]))
                        self.acked_at[key] = time.monotonic()
                        return True
                    if m["op"] == 13 and m["d"].get("nonce") == key:
                        code = int(m["d"]["code"])
                        if code == OUTCOME_UNKNOWN:
                            self.unknown.add(key)
                        else:
                            self.refused[code] += 1
                        return False
        except (OSError, websockets.ConnectionClosed, websockets.InvalidHandshake, TimeoutError):
            self.unknown.add(key)
            if self._ws is not None:
                with contextlib.suppress(Exception):
                    await self._ws.close()
            self._ws = None
            await asyncio.sleep(0.05)
            return False

    async def stream(self, guilds: list[str], stop: asyncio.Event, pause: float = 0.005) -> None:
        """Publish round robin over ``guilds`` until ``stop`` is set."""
        i = 0
        while not stop.is_set():
            await self.publish(guilds[i % len(guilds)])
            i += 1
            await asyncio.sleep(pause)


@dataclass
class Tally:
    acknowledged: int = 0
    delivered: int = 0
    lost: int = 0
    doubled: int = 0
    mislabelled: int = 0
    #: SUBSCRIBED without recovery after a subscriber's first, per guild.
    reloads: int = 0
    details: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.lost == 0 and self.doubled == 0 and self.mislabelled == 0


class Ledger:
    """What publishers were told against what subscribers got."""

    def __init__(self, publishers: list[Publisher], subscribers: list[Subscriber]) -> None:
        self.publishers = publishers
        self.subscribers = subscribers

    def acked(self, until: float | None = None) -> dict[str, tuple[str, str, int]]:
        """Every ACK (or those that came before ``until``, monotonic)."""
        out: dict[str, tuple[str, str, int]] = {}
        for p in self.publishers:
            if until is None:
                out.update(p.acked)
            else:
                out.update((k, v) for k, v in p.acked.items() if p.acked_at[k] <= until)
        return out

    def tally(self, until: float | None = None) -> Tally:
        """The counts over every ACK (or those before ``until``)."""
        acked = self.acked(until)
        at = {k: t for p in self.publishers for k, t in p.acked_at.items() if k in acked}
        t = Tally(acknowledged=len(acked))
        by_epoch: dict[tuple[str, str], dict[int, str]] = {}
        newest: dict[str, str] = {}
        for key, (g, e, s) in acked.items():
            by_epoch.setdefault((g, e), {})[s] = key
        for key in sorted(at, key=at.__getitem__):  # each guild's epoch at its last ACK
            g, e, _ = acked[key]
            newest[g] = e
        for sub in self.subscribers:
            for g in sub.guilds:
                got = sub.got.get(g, [])
                seen = Counter(k for _, _, k in got)
                t.delivered += sum(1 for k in seen if k in acked)
                t.doubled += sum(n - 1 for n in seen.values() if n > 1)
                for e_label, s, k in got:
                    if k in acked and acked[k][1:] != (e_label, s):
                        t.mislabelled += 1
                        if len(t.details) < 10:
                            t.details.append(f"{g}: {k} acked {acked[k][1:]} got {(e_label, s)}")
                owed: set[str] = set()
                final = sub.epoch.get(g)
                wins = sub.windows.get(g, [])
                t.reloads += max(0, len(wins) - 1)
                for i, (e, start, top) in enumerate(wins):
                    ss = by_epoch.get((g, e), {})
                    if i == len(wins) - 1:
                        owed.update(k for s, k in ss.items() if s > start)
                    else:
                        owed.update(k for s, k in ss.items() if start < s <= top)
                if g in newest and newest[g] != final:
                    owed.update(by_epoch.get((g, newest[g]), {}).values())
                missing = owed - set(seen)
                t.lost += len(missing)
                if missing and len(t.details) < 10:
                    t.details.append(f"{g}: {len(missing)} lost, e.g. {sorted(missing)[:3]}")
        return t


async def wait_clean(
    ledger: Ledger, timeout: float, until: float | None = None
) -> tuple[Tally, float]:
    """Poll until nothing acknowledged (before ``until``) is missing, or
    ``timeout``; returns the last tally and the seconds it took."""
    t0 = time.monotonic()
    tally = ledger.tally(until)
    while time.monotonic() - t0 < timeout:
        tally = ledger.tally(until)
        if tally.lost == 0:
            break
        await asyncio.sleep(0.1)
    return tally, time.monotonic() - t0
