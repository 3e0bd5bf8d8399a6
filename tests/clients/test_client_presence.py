"""The Python client's presence roster (docs/PROTOCOL.md "Presence") against a
real node, while 50 plain sessions join and leave around it."""

from __future__ import annotations

import asyncio

from guildcast.client import (
    Backoff,
    Client,
    Item,
    PresenceJoin,
    PresenceLeave,
    PresenceSnapshot,
)
from tests.support import gateway as gw
from tests.support.api import Api
from tests.support.node import api_server
from tests.support.presence import CHURNERS, ROUNDS, churn
from tests.support.wait import until

FAST = {"base": 0.02, "cap": 0.2}


class Replay:
    """Applies the client's presence items as an application would."""

    def __init__(self) -> None:
        self.sessions: set[str] = set()
        self.kinds: list[str] = []
        self.problems: list[str] = []

    def apply(self, item: Item) -> None:
        if isinstance(item, PresenceSnapshot):
            self.kinds.append("snapshot")
            self.sessions = {m.session for m in item.members}
        elif isinstance(item, PresenceJoin):
            self.kinds.append("join")
            if item.member.session in self.sessions:
                self.problems.append(f"join doubled: {item}")
            self.sessions.add(item.member.session)
        elif isinstance(item, PresenceLeave):
            self.kinds.append("leave")
            if item.member.session not in self.sessions:
                self.problems.append(f"leave of a non-member: {item}")
            self.sessions.discard(item.member.session)


async def test_roster_is_snapshot_then_changes_under_churn() -> None:
    gid = "room"
    async with api_server(partition_size=8) as srv, Api(srv.api_url) as api:

        async def true_sessions() -> set[str]:
            status, body, _ = await api.get(f"/v1/guilds/{gid}/presence")
            assert status == 200
            return {m["session"] for m in body["members"]}

        first = await gw.open_ws(srv.url)
        first_id = (await gw.identify(first, srv.token("first"), {gid: None}))["d"]["session_id"]
        kept: list[gw.ClientConnection] = []
        replay = Replay()
        async with Client(
            srv.url, srv.token("watcher"), presence=True, backoff=Backoff(**FAST)
        ) as c:

            async def consume() -> None:
                async for item in c.events():
                    replay.apply(item)

            try:
                async with asyncio.TaskGroup() as app:
                    consumer = app.create_task(consume())
                    assert c.roster(gid) is None
                    joined = [asyncio.Event() for _ in range(CHURNERS)]
                    endings = ("stay", "unsubscribe", "close")
                    async with asyncio.TaskGroup() as tg:
                        tasks = [
                            tg.create_task(
                                churn(
                                    srv.url,
                                    srv.token(f"u{i}"),
                                    gid,
                                    ROUNDS,
                                    endings[i % 3],
                                    joined[i],
                                )
                            )
                            for i in range(CHURNERS)
                        ]
                        await until(lambda: sum(e.is_set() for e in joined) >= 10, "10 joined")
                        await c.subscribe(gid)  # while the others churn
                    results = [t.result() for t in tasks]
                    kept = [ws for _, ws in results if ws is not None]
                    expected = {sid for sid, ws in results if ws is not None}
                    expected |= {first_id, c.session_id or ""}

                    async def settled() -> bool:
                        r = c.roster(gid)
                        return (
                            r is not None
                            and await true_sessions() == expected
                            and {m.session for m in r.members} == expected
                            and replay.sessions == expected
                        )

                    await until(settled, "the roster to equal the true presence", timeout=60)
                    r = c.roster(gid)
                    assert r is not None and not r.truncated
                    assert r.count == len(r.members) == len(expected)
                    consumer.cancel()
            finally:
                for ws in kept:
                    await ws.close()
                await first.close()
        assert replay.problems == []
        assert replay.kinds[0] == "snapshot" and replay.kinds.count("snapshot") == 1
        assert "join" in replay.kinds and "leave" in replay.kinds
