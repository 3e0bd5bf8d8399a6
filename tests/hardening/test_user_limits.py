"""Fair limits for one token holder (issue "Hardening 3", items 4 and 5):
publish volume is bounded per user across all their connections, and one
user cannot fill ``max_guilds`` so that another user's new guild is refused.
Real clients against an embedded node over 127.0.0.1."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from websockets.asyncio.client import ClientConnection

from guildcast.core.tokens import make_token
from tests.support import gateway as gw
from tests.support.node import SECRET, node

#: The per-user volume of the test node: 64 KiB/s, burst one second's worth.
RATE = 64 * 1024
PAD = "z" * 2000


async def publish_many(ws: ClientConnection, gid: str, n: int) -> list[dict[str, Any]]:
    """Send ``n`` PUBLISHes back to back; returns their answers, in order."""
    for i in range(n):
        await gw.send(ws, gw.PUBLISH, {"guild": gid, "t": "N", "d": PAD, "nonce": str(i)})
    out = []
    while len(out) < n:
        m = await gw.recv(ws)
        if m["op"] in (gw.ACK, gw.ERROR):
            out.append(m)
    return out


async def test_publish_volume_is_bounded_per_user_across_connections() -> None:
    async with node(user_publish_bytes=RATE, publish_rate=0) as srv:
        # No pub_rate claim: the node's defaults apply (publish_rate=0 here,
        # so only the per-user volume limits them).
        hog = make_token(SECRET, "hog", ["*"], ["*"])
        other = make_token(SECRET, "other", ["*"], ["*"])
        conns = [(await gw.session(srv.url, hog))[0] for _ in range(4)]
        calm, _ = await gw.session(srv.url, other)
        try:
            t0 = time.monotonic()
            answers = await asyncio.gather(
                *(publish_many(ws, f"hog-{i}", 100) for i, ws in enumerate(conns))
            )
            elapsed = time.monotonic() - t0
            flat = [a for conn in answers for a in conn]
            acked = [a for a in flat if a["op"] == gw.ACK]
            refused = [a for a in flat if a["op"] == gw.ERROR]
            assert all(a["d"]["code"] == 4429 for a in refused), refused[:3]
            # 400 messages of about 2 KiB: only the burst plus the refill got
            # through, however many connections carried them.
            per_msg = 2050
            assert len(acked) * per_msg <= RATE * (1 + elapsed) + per_msg, (len(acked), elapsed)
            assert len(refused) > 0 and len(acked) >= RATE // (per_msg + 100) - 1
            # Another user is not charged for it.
            mine = await publish_many(calm, "calm", 20)
            assert [a["op"] for a in mine] == [gw.ACK] * 20
            # A token with its own pub_rate (0: unlimited) is its issuer's call.
            trusted = make_token(SECRET, "hog", ["*"], ["*"], 0)
            ws, _ = await gw.session(srv.url, trusted)
            conns.append(ws)
            theirs = await publish_many(ws, "trusted", 100)
            assert [a["op"] for a in theirs] == [gw.ACK] * 100
        finally:
            for ws in (*conns, calm):
                await ws.close()


async def identify_many(
    url: str, token: str, guilds: list[str]
) -> tuple[ClientConnection, int, int]:
    """IDENTIFY with ``guilds``; returns (ws, SUBSCRIBED count, ERROR 1013 count)."""
    ws = await gw.open_ws(url)
    await gw.identify(ws, token, dict.fromkeys(guilds))
    subscribed = refused = 0
    while subscribed + refused < len(guilds):
        m = await gw.recv(ws)
        if m["op"] == gw.DISPATCH and m.get("t") == "SUBSCRIBED":
            subscribed += 1
        elif m["op"] == gw.ERROR:
            assert m["d"]["code"] == 1013, m
            refused += 1
    return ws, subscribed, refused


async def test_one_user_cannot_fill_max_guilds() -> None:
    """Five IDENTIFYs with 1,000 new guilds each from one user: the user's
    share (a quarter of max_guilds by default) is all they get, and another
    user's new guild is still served."""
    async with node(max_guilds=5000) as srv:
        hog = make_token(SECRET, "hog", ["*"])
        socks = []
        total = refused_total = 0
        try:
            for k in range(5):
                ws, ok, refused = await identify_many(
                    srv.url, hog, [f"team-{k}-{i}" for i in range(1000)]
                )
                socks.append(ws)
                total += ok
                refused_total += refused
            assert total == 1250 and refused_total == 3750, (total, refused_total)
            assert len(srv.registry) <= 1250
            other = make_token(SECRET, "other", ["*"])
            ws, ok, refused = await identify_many(srv.url, other, ["mine"])
            socks.append(ws)
            assert (ok, refused) == (1, 0)
            # The hog's sessions are still served.
            await gw.send(socks[0], gw.HEARTBEAT)
            while (await gw.recv(socks[0]))["op"] != gw.HEARTBEAT_ACK:
                pass
        finally:
            for ws in socks:
                await ws.close()


async def test_guilds_nobody_subscribes_to_make_room_at_max_guilds() -> None:
    """Guild actors started by PUBLISH alone (no subscriber) fill the
    registry; a new subscription stops one of them instead of being refused."""
    async with node(max_guilds=300, user_guild_share=1.0) as srv:
        for i in range(300):
            await srv.publish(f"pub-only-{i}", "N", {"i": i})
        assert len(srv.registry) == 300
        user = make_token(SECRET, "late", ["*"])
        ws, ok, refused = await identify_many(srv.url, user, [f"new-{i}" for i in range(50)])
        try:
            assert (ok, refused) == (50, 0)
            assert srv.registry.evicted >= 50
            assert len(srv.registry) <= 300
            # An evicted guild keeps its history: it is the broker's.
            _, page = await srv.hub.history("pub-only-0", 0, 10)
            assert [r.s for r in page] == [1]
        finally:
            await ws.close()
