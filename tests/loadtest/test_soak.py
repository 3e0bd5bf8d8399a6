"""The soak (``guildcast loadtest soak``, loadtest/soak.py): its arithmetic,
its reading of ``/metrics`` and a seconds-long run end to end, so the long
run documented in docs/RELIABILITY.md reports what it says."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from guildcast.loadtest.soak import build_parser, main, parse_metrics, slope_per_hour
from tests.support import gateway as gw
from tests.support.api import KEY
from tests.support.node import api_server


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


def test_a_short_soak_end_to_end(tmp_path: Path) -> None:
    """``guildcast loadtest soak``, seconds long: its own server process and
    harness process, samples, transient guilds, and a clean verdict (the
    growth bounds are opened: seconds of samples give no meaningful slope)."""
    out = tmp_path / "soak.json"
    args = "--duration 4 --warmup 0 --interval 1 --clients 6 --guilds 2 --rate 5 --prefill 10"
    args += " --transient 2 --idle-timeout 2 --max-rss-slope 1e9 --max-fd-growth 1e6 --quiet"
    assert main([*args.split(), "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["ok"] and all(r["verdict"].values()), r["verdict"]
    assert r["command"].startswith("guildcast loadtest soak --duration 4")
    assert r["harness"]["rc"] == 0 and r["harness"]["delivered"] > 0
    assert r["harness"]["gaps"] == r["harness"]["dups"] == 0
    assert r["transient"]["guilds"] >= 10 and r["transient"]["failed"] == 0
    assert r["scrape_failures"] == 0
    assert r["server"]["rc"] == 0 and r["server"]["log_errors"] == []
    assert len(r["samples"]) >= 2
    s = r["samples"][-1]
    assert s["rss"] > 0 and s["fds"] > 0 and s["threads"] >= 1
    assert s["metrics"]["guild_actors_started"] >= 10
