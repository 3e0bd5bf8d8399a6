"""Property, end to end: for random event sequences, every connection that
negotiated permessage-deflate decodes exactly the messages an uncompressed
connection of the same kind reads, byte for byte.

Each example starts a real node and connects, with websockets' client,
pairs of sessions (uncompressed, and offering permessage-deflate): plain,
filtered by event name, and recovering (subscribing after the events with
a Position, so its events come as a replay); then publishes a random
sequence of events of random names and sizes (tiny to well past the
threshold, compressible or not) and compares what each pair read.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection

from tests.support.gateway import DISPATCH, identify, open_ws, recv, session
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


async def scenario(seq: list[tuple[str, int, bool]]) -> None:
    async with node(history_size=100) as srv:
        tok = srv.token("p")
        kinds: dict[str, list[str] | None] = {"all": None, "A": ["A"]}
        live: dict[tuple[str, str | None], ClientConnection] = {}
        for kind, filt in kinds.items():
            for mode in (None, "deflate"):
                ws, _ = await session(srv.url, tok, {GID: None}, events=filt, compression=mode)
                live[(kind, mode)] = ws
        for i, (name, size, text) in enumerate(seq):
            await srv.publish(GID, name, payload(size, text, i))
        epoch, _ = await srv.head(GID)
        counts = {"all": len(seq), "A": sum(1 for n, _, _ in seq if n == "A")}
        got: dict[tuple[str, str | None], list[str]] = {}
        for key, ws in live.items():
            got[key] = await read_dispatches(ws, counts[key[0]])
        for mode in (None, "deflate"):  # a replay, through the same rule
            ws = await open_ws(srv.url, compression=mode)
            await identify(ws, tok, {GID: {"epoch": epoch, "s": 0}})
            sub = await recv(ws)
            assert sub["op"] == DISPATCH and sub["d"]["recovered"], sub
            got[("replay", mode)] = await read_dispatches(ws, len(seq))
            live[("replay", mode)] = ws
        for kind in ("all", "A", "replay"):
            assert got[(kind, "deflate")] == got[(kind, None)], kind
        assert got[("replay", None)] == got[("all", None)]
        if any(size >= srv.config.compression_threshold for _, size, _ in seq):
            assert srv.stats_counters.deliveries_compressed > 0
        for ws in live.values():
            await ws.close()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(events)
def test_every_connection_decodes_what_it_would_have_received(
    seq: list[tuple[str, int, bool]],
) -> None:
    asyncio.run(scenario(seq))
