"""The Python client's pacing of refused connects (PROTOCOL.md "Pacing"):
a connect refused while the node is down is tried again soon and without
growing its backoff, or, after a RECONNECT that named a delay range, exactly
the range's width later; against a real node stopped and started again on
its port."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import replace

import pytest

from guildcast import Config, Server
from guildcast.client import Backoff, Client
from guildcast.protocol import client as pc
from tests.support.node import SECRET, restartable
from tests.support.redis import free_port
from tests.support.wait import until

_DELAY = re.compile(
    r"closed 1006 connect failed: ConnectionRefusedError.*reconnecting in ([0-9.]+) s"
)


def refused_delays(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The delays the client logged after a refused connect."""
    out = []
    for rec in caplog.records:
        m = _DELAY.search(rec.getMessage())
        if m:
            out.append(float(m.group(1)))
    return out


async def test_after_a_reconnect_range_refused_connects_wait_its_width(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="guildcast.client")
    async with restartable() as r:
        c = Client(
            r.url, r.srv.token("app", guilds=["*"]), guilds=["g"], backoff=Backoff(0.02, 0.2)
        )
        await c.connect()
        try:
            # A lone node's drain: RECONNECT {0, 1000} (its floor), then 1001.
            await r.srv.stop()
            await until(lambda: c.counters["refused_connects"] >= 2, "two refused connects")
            r.srv = Server(r.config)
            await r.srv.start()
            await until(lambda: c.sessions == 2, "back on the node started again")
        finally:
            await c.close()
    assert c.counters["reconnect_requests"] == 1 and c.counters["hinted_waits"] >= 1
    delays = refused_delays(caplog)
    assert len(delays) >= 2
    # The range's width (1 s), not the backoff's 0.2 s cap nor a draw.
    assert delays == [1.0] * len(delays)


async def test_refused_connects_do_not_grow_the_backoff(caplog: pytest.LogCaptureFixture) -> None:
    """No RECONNECT came (a crash, or a client started before its server):
    a draw within 1 s each time, though this backoff's windows are 5 s and
    more; the client is in once the node listens."""
    caplog.set_level(logging.INFO, logger="guildcast.client")
    port = free_port()
    cfg = Config(host="127.0.0.1", port=port, secret=SECRET)
    token = Server(cfg).token("app", guilds=["*"])
    backoff = Backoff(base=5.0, cap=60.0)
    c = Client(f"ws://127.0.0.1:{port}/gateway", token, guilds=["g"], backoff=backoff)
    connecting = asyncio.create_task(c.connect())
    try:
        await until(lambda: c.counters["refused_connects"] >= 4, "four refused connects")
        assert backoff.attempt == 0  # none of them grew the window
        srv = Server(replace(cfg))
        await srv.start()
        try:
            async with asyncio.timeout(30):
                await connecting
            assert c.sessions == 1
        finally:
            await c.close()
            await srv.stop()
    finally:
        connecting.cancel()
    delays = refused_delays(caplog)
    assert len(delays) >= 4
    assert all(0.0 <= d <= pc.REFUSED_WINDOW for d in delays), delays
