"""Property, end to end: for random event sequences, every connection that
negotiated permessage-deflate decodes exactly the messages an uncompressed
connection of the same kind reads, byte for byte.

Each example starts a real node and connects, with websockets' client,
pairs of sessions (uncompressed, and offering permessage-deflate): plain,
filtered by event name, passive (GUILD_ACTIVITY notices, built once per
guild per tick), and recovering (subscribing after the events with a
Position or a rewind, several at once, so their events come as replays
framed once per batch by ``ReplayPages``); then publishes a random sequence
of events of random names and sizes (tiny to well past the threshold,
compressible or not) and compares what each pair read, and the
PRESENCE_SNAPSHOT a pair of presence sessions reads when it subscribes
again. The threshold is drawn too: at 16 bytes every notice and snapshot
is a candidate for compression.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection

from tests.support.gateway import (
    DISPATCH,
    HELLO,
    IDENTIFY,
    SUBSCRIBE,
    identify,
    open_ws,
    recv,
    send,
    session,
)
from tests.support.node import node
from tests.support.wait import TIMEOUT

GID = "prop"

events = st.lists(
    st.tuples(
        st.sampled_from(["A", "B", "C"]),
        st.integers(0, 6000),
        st.booleans(),  # compressible text, or random hex
    ),
    min_size=1,
    max_size=25,
)


def payload(size: int, text: bool, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    if text:
        words = ["alpha", "beta", "deploy", "cache", "green", "ok", "the", "graph"]
        body = " ".join(rng.choice(words) for _ in range(size // 5 + 1))[:size]
    else:
        body = rng.randbytes(size // 2 + 1).hex()[:size]
    return {"seed": seed, "body": body}


async def read_dispatches(ws: ClientConnection, n: int) -> list[str]:
    out: list[str] = []
    async with asyncio.timeout(TIMEOUT):
        while len(out) < n:
            raw = await ws.recv()
            assert isinstance(raw, str)
            msg = orjson.loads(raw)
            if msg["op"] == DISPATCH and "s" in msg:  # an event, not READY/SUBSCRIBED
                out.append(raw)
    return out


async def read_notices(ws: ClientConnection, head: int) -> list[str]:
    """GUILD_ACTIVITY notices (exact texts) until one names ``head``."""
    out: list[str] = []
    async with asyncio.timeout(TIMEOUT):
        while True:
            raw = await ws.recv()
            assert isinstance(raw, str)
            msg = orjson.loads(raw)
            assert msg["op"] == DISPATCH and msg["t"] == "GUILD_ACTIVITY", msg  # never an event
            out.append(raw)
            if msg["d"]["s"] == head:
                return out


async def presence_session(url: str, tok: str, mode: str | None) -> ClientConnection:
    ws = await open_ws(url, compression=mode)
    assert (await recv(ws))["op"] == HELLO
    await send(ws, IDENTIFY, {"token": tok, "guilds": {}, "presence": True})
    assert (await recv(ws))["t"] == "READY"
    return ws


async def snapshot(ws: ClientConnection) -> str:
    """SUBSCRIBE with presence; the PRESENCE_SNAPSHOT text that follows SUBSCRIBED."""
    await send(ws, SUBSCRIBE, {"guilds": {GID: None}})
    async with asyncio.timeout(TIMEOUT):
        while True:
            raw = await ws.recv()
            assert isinstance(raw, str)
            if orjson.loads(raw).get("t") == "PRESENCE_SNAPSHOT":
                return raw


async def recovering(
    url: str, tok: str, mode: str | None, guild: dict[str, Any], n: int
) -> tuple[ClientConnection, list[str]]:
    ws = await open_ws(url, compression=mode)
    await identify(ws, tok, {GID: guild})
    sub = await recv(ws)
    assert sub["op"] == DISPATCH and sub["d"]["recovered"], sub
    return ws, await read_dispatches(ws, n)


async def scenario(seq: list[tuple[str, int, bool]], threshold: int) -> None:
    async with node(
        history_size=100, passive_interval=0.02, compression_threshold=threshold
    ) as srv:
        tok = srv.token("p")
        kinds: dict[str, list[str] | None] = {"all": None, "A": ["A"]}
        live: dict[tuple[str, str | None], ClientConnection] = {}
        for kind, filt in kinds.items():
            for mode in (None, "deflate"):
                ws, _ = await session(srv.url, tok, {GID: None}, events=filt, compression=mode)
                live[(kind, mode)] = ws
        for mode in (None, "deflate"):
            ws, subs = await session(srv.url, tok, {GID: {"passive": True}}, compression=mode)
            assert subs[GID]["passive"] is True
            live[("passive", mode)] = ws
        for i, (name, size, text) in enumerate(seq):
            await srv.publish(GID, name, payload(size, text, i))
        epoch, head = await srv.head(GID)
        counts = {"all": len(seq), "A": sum(1 for n, _, _ in seq if n == "A")}
        got: dict[tuple[str, str | None], list[str]] = {}
        for key, ws in live.items():
            if key[0] == "passive":
                got[key] = await read_notices(ws, head)
            else:
                got[key] = await read_dispatches(ws, counts[key[0]])
        # Replays through the same rule: several sessions of each kind
        # recovering at once (a Position, a later one, a rewind), so a guild
        # batch can serve them from the same ReplayPages.
        mid = len(seq) // 2
        asks: list[tuple[str, dict[str, Any], int]] = [
            ("replay", {"epoch": epoch, "s": 0}, len(seq)),
            ("replay-mid", {"epoch": epoch, "s": mid}, len(seq) - mid),
            ("rewind", {"rewind": len(seq)}, len(seq)),
        ]
        jobs = [
            recovering(srv.url, tok, mode, guild, n)
            for _, guild, n in asks
            for mode in (None, "deflate")
        ]
        done = await asyncio.gather(*jobs)
        for (kind, _, _), mode, (ws, texts) in zip(
            [a for a in asks for _ in (0, 1)], [None, "deflate"] * len(asks), done, strict=True
        ):
            got[(kind, mode)] = texts
            live[(kind, mode)] = ws
        # Presence: two sessions (one of each mode) subscribe with presence,
        # then, once both are members, subscribe again: the same snapshot.
        pres = {mode: await presence_session(srv.url, tok, mode) for mode in (None, "deflate")}
        for mode, ws in pres.items():
            await snapshot(ws)
            live[("presence", mode)] = ws
        for mode, ws in pres.items():
            got[("presence", mode)] = [await snapshot(ws)]
        for kind in ("all", "A", "passive", "replay", "replay-mid", "rewind", "presence"):
            assert got[(kind, "deflate")] == got[(kind, None)], kind
        assert got[("replay", None)] == got[("all", None)] == got[("rewind", None)]
        assert got[("replay-mid", None)] == got[("all", None)][mid:]
        members = orjson.loads(got[("presence", None)][0])["d"]["members"]
        assert len(members) == len(live)  # every session of the scenario is a member
        if any(size >= threshold for _, size, _ in seq):
            assert srv.stats_counters.deliveries_compressed > 0
        for ws in live.values():
            await ws.close()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(events, st.sampled_from([16, 128]))
def test_every_connection_decodes_what_it_would_have_received(
    seq: list[tuple[str, int, bool]], threshold: int
) -> None:
    asyncio.run(scenario(seq, threshold))
