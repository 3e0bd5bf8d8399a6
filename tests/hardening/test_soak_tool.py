"""The soak's own arithmetic and its reading of ``/metrics`` (loadtest/soak.py),
so the long run documented in docs/RELIABILITY.md reports what it says."""

from __future__ import annotations

import aiohttp
import pytest

from guildcast.loadtest.soak import build_parser, parse_metrics, slope_per_hour
from tests.apihelp import KEY, api_server
from tests.integration import gw


def test_slope_per_hour() -> None:
    assert slope_per_hour([]) == 0.0
    assert slope_per_hour([(0.0, 5.0)]) == 0.0
    assert slope_per_hour([(0.0, 1.0), (1.0, 1.0), (2.0, 1.0)]) == 0.0
    # +2 per second is +7,200 per hour, whatever the noise around the line.
    pts = [(float(t), 2.0 * t + (1 if t % 2 else -1)) for t in range(100)]
    assert slope_per_hour(pts) == pytest.approx(7200.0, rel=0.01)


async def test_parse_metrics_reads_a_live_node() -> None:
    async with api_server() as srv:
        ws, _ = await gw.session(srv.url, srv.token("u"), {"a": None, "b": None})
        await srv.publish("a", "E", 1)
        async with (
            aiohttp.ClientSession() as http,
            http.get(srv.api_url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}) as r,
        ):
            gauges, mailbox = parse_metrics(await r.text())
        assert gauges["guild_actors"] == 2
        assert gauges["connections"] == 1
        assert gauges["sessions_identified"] == 1
        assert gauges["events_published"] == 1
        assert gauges["guild_actors_started"] == 2
        assert set(mailbox) == {"guild", "partition"}
        await ws.close()


def test_defaults_are_the_documented_command() -> None:
    a = build_parser().parse_args([])
    assert (a.duration, a.warmup, a.clients, a.guilds, a.rate) == (1800.0, 300.0, 1000, 10, 40.0)
    assert (a.transient, a.prefill, a.idle_timeout, a.interval) == (20, 12_000, 30.0, 5.0)
