"""A client that stops reading is closed with 4010 while 50 others keep
receiving every event on time, and server memory stays bounded
(PROTOCOL.md "Close codes" 4010; docs/DESIGN.md hot-path rule 3)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import psutil  # type: ignore[import-untyped]

from tests.integration.raw import RawWs
from tests.support import gateway as gw
from tests.support.node import node
from tests.support.wait import until

HEALTHY = 50
#: 16 KiB events: a stalled socket fills its kernel buffers and then the
#: 256 KiB user-space bound within a few hundred events.
EVENT_DATA = "x" * 16_000
MAX_BUFFER = 256 * 1024
#: The publisher never runs more than this many events ahead of the slowest
#: healthy reader, so the healthy readers (tasks in this same process) stay
#: far below MAX_BUFFER and only the stalled client can trip it.
WINDOW = 8
#: Upper bound on events published while waiting for the 4010 (the stalled
#: socket's kernel buffers hold a few MiB at most).
MAX_EVENTS = 2000
#: Resident memory the whole test may add to this process.
RSS_BOUND = 200 * 1024 * 1024
#: "On time": the longest any healthy reader waits for an event.
MAX_LAG = 10.0


async def test_stalled_client_is_closed_4010_others_unaffected() -> None:
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    async with node(max_buffer=MAX_BUFFER) as srv, asyncio.timeout(120):
        token = srv.token("reader", guilds=["slow"])
        healthy = await asyncio.gather(
            *(gw.session(srv.url, token, {"slow": None}) for _ in range(HEALTHY))
        )

        # The stalled client: a tiny receive window, and it never reads again
        # after SUBSCRIBED.
        stalled = await RawWs.open(srv.port, rcvbuf=4096)
        assert await stalled.handshake() == 101
        assert (await stalled.next_json())["op"] == gw.HELLO
        await stalled.send_json(
            {"op": gw.IDENTIFY, "d": {"token": token, "guilds": {"slow": None}}}
        )
        assert (await stalled.next_json())["t"] == "READY"
        assert (await stalled.next_json())["t"] == "SUBSCRIBED"

        published_at: dict[int, float] = {}
        progress = [0] * HEALTHY
        advanced = asyncio.Event()
        lag = [0.0] * HEALTHY

        async def read(i: int, ws: Any) -> list[int]:
            got: list[int] = []
            while True:
                m = orjson.loads(await ws.recv())
                assert m["op"] == gw.DISPATCH and m["g"] == "slow", m
                got.append(m["s"])
                lag[i] = max(lag[i], time.monotonic() - published_at[m["s"]])
                progress[i] = m["s"]
                advanced.set()
                if m["t"] == "END":
                    return got

        readers = [asyncio.create_task(read(i, ws)) for i, (ws, _) in enumerate(healthy)]

        async def publish(t: str, d: Any) -> int:
            head = max(published_at, default=0)
            while head - min(progress) >= WINDOW:
                advanced.clear()
                await advanced.wait()
            published_at[head + 1] = time.monotonic()
            got = await srv.publish("slow", t, d)
            assert got == head + 1
            return got

        n = 0
        while srv.gateway.slow_consumers == 0 and n < MAX_EVENTS:
            await publish("BIG", EVENT_DATA)
            n += 1
        assert srv.gateway.slow_consumers == 1, f"no 4010 after {n} events"
        assert srv.gateway.close_codes.get(4010) == 1
        # Life goes on for everyone else.
        for _ in range(50):
            await publish("BIG", EVENT_DATA)
        end = await publish("END", None)
        results = await asyncio.gather(*readers)

        for got in results:
            assert got == list(range(1, end + 1))
        assert max(lag) < MAX_LAG, max(lag)
        assert srv.gateway.stats()["connections"] == HEALTHY + 1
        assert srv.gateway.close_codes.get(4010) == 1  # nobody else

        # The stalled client, reading at last, finds the close frame 4010
        # after what was queued before it.
        code, frames = await stalled.read_until_close()
        assert code == 4010
        ss = [orjson.loads(p)["s"] for op, p in frames if op == 1]
        assert ss == list(range(1, len(ss) + 1)) and len(ss) < end
        stalled.close()
        await until(lambda: srv.gateway.stats()["connections"] == HEALTHY)

        grew = proc.memory_info().rss - rss0
        print(f"\n4010 after {n} events of {len(EVENT_DATA)} B; RSS grew {grew >> 20} MiB")
        assert grew < RSS_BOUND, f"RSS grew by {grew >> 20} MiB"
        for ws, _ in healthy:
            await ws.close()
