"""Presence under churn, seen by plain WebSocket clients (docs/PROTOCOL.md "Presence").

- :class:`PresenceView`: a presence subscriber written from the protocol
  text alone (``websockets`` and JSON): it applies PRESENCE_SNAPSHOT, then
  each PRESENCE_JOIN/LEAVE, and records every inconsistency: a join of a
  session already in its set (doubled), a leave of one not in it (a join
  missed), a presence dispatch before the snapshot.
- :func:`churn`: one session that joins, leaves and joins a guild again
  ``rounds`` times (UNSUBSCRIBE/SUBSCRIBE), then stays, unsubscribes or
  disconnects, as ``ending`` says.

Every wait is bounded by :data:`~tests.support.wait.TIMEOUT`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from tests.support import gateway as gw
from tests.support.wait import TIMEOUT, until


@dataclass
class PresenceView:
    """Snapshot then diffs, applied as a client would."""

    gid: str
    #: session id -> member, as snapshot and diffs say.
    members: dict[str, dict[str, Any]] = field(default_factory=dict)
    count: int = -1
    truncated: bool = False
    snapshots: int = 0
    joins: int = 0
    leaves: int = 0
    #: Inconsistencies seen (must stay empty).
    problems: list[str] = field(default_factory=list)
    session_id: str = ""
    #: The last PRESENCE_SNAPSHOT's ``d``.
    snapshot: dict[str, Any] = field(default_factory=dict)

    def apply(self, m: dict[str, Any]) -> None:
        t, d = m.get("t"), m.get("d")
        if m.get("g") != self.gid or t not in (
            "PRESENCE_SNAPSHOT",
            "PRESENCE_JOIN",
            "PRESENCE_LEAVE",
        ):
            return
        assert "s" not in m, m  # presence is not part of the guild's sequence
        assert isinstance(d, dict), m
        if t == "PRESENCE_SNAPSHOT":
            self.snapshots += 1
            self.snapshot = d
            self.members = {x["session"]: x for x in d["members"]}
            self.count, self.truncated = d["count"], d["truncated"]
            if len(self.members) != len(d["members"]):
                self.problems.append(f"a session twice in a snapshot: {d}")
            if not self.truncated and self.count != len(self.members):
                self.problems.append(f"count {self.count} of {len(self.members)} listed")
            return
        if self.snapshots == 0:
            self.problems.append(f"{t} before PRESENCE_SNAPSHOT: {d}")
        sid = d["session"]
        if t == "PRESENCE_JOIN":
            self.joins += 1
            if sid in self.members:
                self.problems.append(f"join doubled: {d}")
            self.members[sid] = d
            self.count += 1
        else:
            self.leaves += 1
            if sid not in self.members and not self.truncated:
                self.problems.append(f"leave of a session not in the set (a join missed): {d}")
            self.members.pop(sid, None)
            self.count -= 1

    def sessions(self) -> set[str]:
        return set(self.members)


async def watch(
    url: str, token: str, view: PresenceView, subscribed: asyncio.Event, resubscribes: int = 0
) -> None:
    """IDENTIFY with presence for ``view.gid`` and apply what comes until the
    connection closes (the caller ends it by cancelling this). After each
    snapshot it SUBSCRIBEs again, ``resubscribes`` times (each answered with
    SUBSCRIBED and a new snapshot, which replaces the set): every one is a
    snapshot taken while others join and leave. ``subscribed`` is set once
    the last of them has come."""
    ws = await gw.open_ws(url)
    try:
        hello = await gw.recv(ws)
        assert hello["op"] == gw.HELLO
        await gw.send(
            ws, gw.IDENTIFY, {"token": token, "guilds": {view.gid: None}, "presence": True}
        )
        ready = await gw.recv(ws)
        assert ready["t"] == "READY", ready
        view.session_id = ready["d"]["session_id"]
        async with asyncio.TaskGroup() as tg:
            # Alive however long the caller waits: a watcher closed 4009 (no
            # heartbeat) would hide why its set did not converge.
            beat = tg.create_task(heartbeat(ws, hello["d"]["heartbeat_interval"] / 1000.0))
            try:
                async for raw in ws:
                    m = orjson.loads(raw)
                    if m.get("t") == "SUBSCRIBED" and m.get("g") == view.gid:
                        # SUBSCRIBED, then at once the snapshot: nothing of the guild between.
                        nxt = await gw.recv(ws)
                        while nxt["op"] == gw.HEARTBEAT_ACK:
                            nxt = await gw.recv(ws)
                        assert nxt["t"] == "PRESENCE_SNAPSHOT" and nxt["g"] == view.gid, nxt
                        view.apply(nxt)
                        if resubscribes > 0:
                            resubscribes -= 1
                            await gw.send(ws, gw.SUBSCRIBE, {"guilds": {view.gid: None}})
                        else:
                            subscribed.set()
                        continue
                    view.apply(m)
            finally:
                beat.cancel()
    finally:
        await ws.close()


async def heartbeat(ws: gw.ClientConnection, interval: float) -> None:
    """HEARTBEAT every half ``interval`` (HELLO's, in seconds) until the
    connection closes (docs/PROTOCOL.md: the server closes 4009 without one)."""
    while True:
        await asyncio.sleep(interval / 2)
        try:
            await gw.send(ws, gw.HEARTBEAT)
        except gw.ConnectionClosed:
            return


async def churn(
    url: str, token: str, gid: str, rounds: int, ending: str, joined: asyncio.Event | None = None
) -> tuple[str, gw.ClientConnection | None]:
    """Join ``gid``, leave and join again ``rounds`` times, then ``ending``:
    "stay" (still subscribed: the connection is returned for the caller to
    close), "unsubscribe" (then disconnect) or "close". Returns the session
    id (READY's, which presence names) and the kept connection, if any.
    ``joined`` is set after the first join."""
    ws = await gw.open_ws(url)
    ready = await gw.identify(ws, token, {gid: None})
    sid = ready["d"]["session_id"]
    await _until_t(ws, "SUBSCRIBED", gid)
    if joined is not None:
        joined.set()
    for _ in range(rounds):
        await gw.send(ws, gw.UNSUBSCRIBE, {"guilds": [gid]})
        await _until_t(ws, "UNSUBSCRIBED", gid)
        await gw.send(ws, gw.SUBSCRIBE, {"guilds": {gid: None}})
        await _until_t(ws, "SUBSCRIBED", gid)
    if ending == "stay":
        return sid, ws
    if ending == "unsubscribe":
        await gw.send(ws, gw.UNSUBSCRIBE, {"guilds": [gid]})
        await _until_t(ws, "UNSUBSCRIBED", gid)
    await ws.close()
    return sid, None


async def _until_t(ws: gw.ClientConnection, t: str, gid: str) -> None:
    while True:
        m = await gw.recv(ws)
        if m.get("t") == t and m.get("g") == gid:
            return


#: Sessions that churn in :func:`churn_while_watching` (the issue's 50).
CHURNERS = 50
#: Leave-and-join rounds each churner makes after its first join.
ROUNDS = 3
#: Snapshots each watcher asks for again while the churn goes on.
RESUBSCRIBES = 20


async def churn_while_watching(
    urls: list[str],
    watch_urls: list[str],
    gid: str,
    token: Callable[[str], str],
    true_members: Callable[[], Awaitable[set[str]]],
) -> list[PresenceView]:
    """:data:`CHURNERS` sessions (spread over ``urls``) join, leave and join
    ``gid`` concurrently and end staying, unsubscribed or disconnected; a
    presence watcher subscribes on each of ``watch_urls`` while they churn
    (the first once 10 have joined, the next ones later). Once quiet, every
    watcher's snapshot-plus-diffs set must equal the true member set (the
    HTTP presence API, ``true_members``) and the sessions known to stay, with
    no join doubled or missed on the way. Returns the views."""
    joined = [asyncio.Event() for _ in range(CHURNERS)]
    views = [PresenceView(gid) for _ in watch_urls]
    subscribed = [asyncio.Event() for _ in watch_urls]
    endings = ("stay", "unsubscribe", "close")
    kept: list[gw.ClientConnection] = []
    try:
        async with asyncio.TaskGroup() as watchers:
            tasks: list[asyncio.Task[None]] = []
            async with asyncio.TaskGroup() as tg:
                churners = [
                    tg.create_task(
                        churn(
                            urls[i % len(urls)],
                            token(f"user{i}"),
                            gid,
                            ROUNDS,
                            endings[i % len(endings)],
                            joined[i],
                        )
                    )
                    for i in range(CHURNERS)
                ]
                for i, url in enumerate(watch_urls):
                    # Subscribe while the churn is under way, each at another moment.
                    threshold = min(CHURNERS, 10 + 15 * i)
                    await until(
                        lambda n=threshold: sum(e.is_set() for e in joined) >= n,
                        f"{threshold} churners joined",
                    )
                    tasks.append(
                        watchers.create_task(
                            watch(url, token(f"watcher{i}"), views[i], subscribed[i], RESUBSCRIBES)
                        )
                    )
            results = [c.result() for c in churners]
            kept = [ws for _, ws in results if ws is not None]
            for e in subscribed:
                async with asyncio.timeout(TIMEOUT):
                    await e.wait()
            stay = {sid for sid, ws in results if ws is not None}
            expected = stay | {v.session_id for v in views}

            async def quiet() -> bool:
                return await true_members() == expected and all(
                    v.sessions() == expected for v in views
                )

            try:
                await until(quiet, "presence to settle, as the watchers see it", timeout=60)
            except AssertionError:
                raise AssertionError(
                    f"expected {sorted(expected)}; true {sorted(await true_members())}; "
                    + "; ".join(
                        f"view {i}: extra {sorted(v.sessions() - expected)} "
                        f"missing {sorted(expected - v.sessions())} problems {v.problems}"
                        for i, v in enumerate(views)
                    )
                ) from None
            for t in tasks:
                t.cancel()
    finally:
        for ws in kept:
            await ws.close()
    for v in views:
        assert v.problems == [], v.problems
        assert v.snapshots >= 1
        assert not v.truncated and v.count == len(v.members)
    return views
