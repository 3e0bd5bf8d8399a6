"""/metrics: Prometheus text that parses, counters that move with traffic,
one registry per node, and the key rule (open only with ``metrics_open``)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.support.api import Api
from tests.support.gateway import HELLO, IDENTIFY, open_ws, recv, send, session, subscribe
from tests.support.node import api_server
from tests.support.wait import TIMEOUT, until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(api: Api) -> tuple[Samples, set[str]]:
    status, body, headers = await api.get("/metrics")
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain")
    samples: Samples = {}
    families = set()
    for fam in text_string_to_metric_families(body.decode()):
        families.add(fam.name)
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, families


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_parse_and_move_with_traffic() -> None:
    async with api_server() as srv, Api(srv.api_url) as api:
        m0, families = await scrape(api)
        assert {
            "guildcast_connections",
            "guildcast_sessions_identified",
            "guildcast_subscriptions",
            "guildcast_guild_actors",
            "guildcast_events_published",
            "guildcast_deliveries",
            "guildcast_bytes_written",
            "guildcast_slow_consumers",
            "guildcast_closes",
            "guildcast_publish_to_write_seconds",
            "guildcast_mailbox_messages",
            "guildcast_mailbox_messages_max",
            "guildcast_ready",
        } <= families
        assert value(m0, "guildcast_ready") == 1

        tok = srv.token("u", guilds=["*"])
        ws1, _ = await subscribe(srv.url, tok, "mx")
        ws2, _ = await subscribe(srv.url, tok, "mx")
        events = [{"guild": "mx", "t": "N", "d": {"i": i}} for i in range(10)]
        status, _, _ = await api.publish({"events": events})
        assert status == 200
        frames = 0
        for ws in (ws1, ws2):
            for _ in range(10):
                msg = await recv(ws)
                frames += len(orjson.dumps(msg))
        # a bad token: closed with 4004
        bad = await connect(srv.url, proxy=None, open_timeout=TIMEOUT)
        await recv(bad)
        await bad.send(orjson.dumps({"op": 2, "d": {"token": "nope", "guilds": {}}}).decode())
        async with asyncio.timeout(TIMEOUT):
            await bad.wait_closed()
        assert bad.close_code == 4004
        await until(lambda: len(srv.gateway.connections) == 2, "the refused session to go")

        m1, _ = await scrape(api)
        assert (
            value(m1, "guildcast_events_published_total")
            - value(m0, "guildcast_events_published_total")
            == 10
        )
        assert (
            value(m1, "guildcast_deliveries_total") - value(m0, "guildcast_deliveries_total") == 20
        )
        # every frame: the JSON plus at least its 2-byte header
        assert value(m1, "guildcast_bytes_written_total") >= frames + 2 * 20
        assert value(m1, "guildcast_connections") == 2
        assert value(m1, "guildcast_connections_accepted_total") == 3
        assert value(m1, "guildcast_sessions_identified") == 2
        assert value(m1, "guildcast_subscriptions") == 2
        assert value(m1, "guildcast_guild_actors") >= 1
        assert value(m1, "guildcast_closes_total", code="4004") == 1
        # one guild, one partition: ten observations, all in some bucket
        count = value(m1, "guildcast_publish_to_write_seconds_count")
        assert count - value(m0, "guildcast_publish_to_write_seconds_count") == 10
        assert value(m1, "guildcast_publish_to_write_seconds_bucket", le="+Inf") == count
        assert value(m1, "guildcast_publish_to_write_seconds_sum") > 0
        assert value(m1, "guildcast_http_requests_total", route="/v1/publish", status="200") == 1
        assert value(m1, "guildcast_http_requests_total", route="/metrics", status="200") >= 1
        assert (
            "guildcast_mailbox_messages",
            frozenset({("actor", "guild")}),
        ) in m1
        await ws1.close()
        await ws2.close()
        await until(lambda: not srv.gateway.connections, "clients to go")
        m2, _ = await scrape(api)
        assert value(m2, "guildcast_connections") == 0
        assert value(m2, "guildcast_subscriptions") == 0
        assert value(m2, "guildcast_closes_total", code="4004") == 1


async def test_metrics_key_rule_and_one_registry_per_node() -> None:
    async with api_server() as closed, api_server(metrics_open=True) as opened:
        async with Api(closed.api_url, key=None) as anon:
            assert (await anon.get("/metrics"))[0] == 401
        async with Api(opened.api_url, key=None) as anon:
            await opened.publish("only-here", "E")
            samples, _ = await scrape(anon)
            assert value(samples, "guildcast_events_published_total") == 1
        async with Api(closed.api_url) as api:
            samples, _ = await scrape(api)
            assert value(samples, "guildcast_events_published_total") == 0


async def test_journal_metrics_with_data_dir(tmp_path: Path) -> None:
    async with api_server(data_dir=str(tmp_path), fsync="always") as srv:
        async with Api(srv.api_url) as api:
            for i in range(3):
                assert (await api.publish({"guild": "j", "t": "E", "d": i}))[0] == 200
            samples, _ = await scrape(api)
        assert value(samples, "guildcast_journal_bytes_total") > 0
        assert value(samples, "guildcast_journal_fsyncs_total") >= 3
        assert value(samples, "guildcast_journal_repairs_total") == 0


async def test_each_layer_reports_its_own_fields_and_the_node_composes_them() -> None:
    """/metrics is composed from what each layer reports (ReportsMetrics):
    the gateway its connections, the hub its guild actors, the actors'
    counters their events; none fills another's fields."""
    from guildcast.core.metrics import MetricsSnapshot, ReportsMetrics

    async with api_server() as srv:
        tok = srv.token("u", guilds=["*"])
        ws, _ = await subscribe(srv.url, tok, "layers")
        await srv.publish("layers", "E", 1)
        await recv(ws)
        await until(lambda: srv.stats_counters.deliveries >= 1, "the delivery")
        for part in (srv.gateway, srv.hub, srv.stats_counters, srv.broker):
            assert isinstance(part, ReportsMetrics)
        gw, hub, counters = MetricsSnapshot(), MetricsSnapshot(), MetricsSnapshot()
        srv.gateway.report_metrics(gw)
        srv.hub.report_metrics(hub)
        srv.stats_counters.report_metrics(counters)
        assert (gw.connections, gw.sessions_identified, gw.guilds_alive, gw.published) == (
            1,
            1,
            0,
            0,
        )
        assert (hub.guilds_alive, hub.subscriptions, hub.connections) == (1, 1, 0)
        assert "guild" in hub.mailboxes and "guild" not in gw.mailboxes
        assert (counters.published, counters.deliveries, counters.connections) == (1, 1, 0)
        m = srv.metrics()
        assert (m.connections, m.guilds_alive, m.subscriptions, m.published) == (1, 1, 1, 1)
        assert m.ready and m.broker_up
        await ws.close()


def render(srv: Any) -> Samples:
    """The node's /metrics text rendered now, in this loop step (a scrape
    over HTTP would let the admitter move on while it travels)."""
    assert srv.api is not None
    samples: Samples = {}
    for fam in text_string_to_metric_families(generate_latest(srv.api.registry).decode()):
        for s in fam.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


async def test_admission_counters_rate_and_queue_depth_are_on_metrics() -> None:
    """Admission control (transport/admission.py) reports on /metrics like
    every layer: admitted and queued by kind, refused with 1013 by kind, the
    rate admitted now (after the loop-lag halving) and the queue's depth."""
    async with api_server(admit_rate=1.0) as srv, Api(srv.api_url) as api:
        adm = srv.gateway.admission
        m0, families = await scrape(api)
        assert {
            "guildcast_admission_admitted",
            "guildcast_admission_queued",
            "guildcast_admission_refused",
            "guildcast_admission_slowdowns",
            "guildcast_admission_rate",
            "guildcast_admission_queue_depth",
        } <= families
        # 1/s, or half of it if this (shared) machine made the loop late.
        assert 0.5 <= value(m0, "guildcast_admission_rate") <= 1.0
        assert value(m0, "guildcast_admission_queue_depth") == 0
        tok = srv.token("u", guilds=["*"])
        # A fresh session takes the one token of the burst ...
        ws_a, subs = await session(srv.url, tok, {"g": None})
        position = {"epoch": subs["g"]["epoch"], "s": subs["g"]["s"]}
        # ... so the next fresh one and a resume wait for theirs.
        ws_b = await open_ws(srv.url)
        assert (await recv(ws_b))["op"] == HELLO
        await send(ws_b, IDENTIFY, {"token": tok, "guilds": {}})
        await until(lambda: adm.waiting == 1, "the fresh IDENTIFY to wait")
        m1 = render(srv)
        assert value(m1, "guildcast_admission_queue_depth") == 1
        assert value(m1, "guildcast_admission_queued_total", kind="fresh") == 1
        assert value(m1, "guildcast_admission_admitted_total", kind="fresh") == 1
        m = await recv(ws_b)
        assert m["t"] == "READY", m
        # B took the token that came: a resume now waits for the next.
        ws_r = await open_ws(srv.url)
        assert (await recv(ws_r))["op"] == HELLO
        await send(ws_r, IDENTIFY, {"token": tok, "guilds": {"g": position}})
        await until(lambda: adm.waiting == 1, "the resume to wait")
        # Upgrades at once past the handshake bucket (2 a second): 1013.
        flood = await asyncio.gather(*(open_ws(srv.url) for _ in range(6)))
        busy = 0
        for ws in flood:
            try:
                assert (await recv(ws))["op"] == HELLO
            except ConnectionClosed:
                assert ws.close_code == 1013, ws.close_code
                busy += 1
        assert busy >= 1
        m = await recv(ws_r)
        assert m["t"] == "READY", m
        assert adm.waiting == 0
        m2, _ = await scrape(api)
        assert value(m2, "guildcast_admission_admitted_total", kind="fresh") == 2
        assert value(m2, "guildcast_admission_admitted_total", kind="resume") == 1
        assert value(m2, "guildcast_admission_queued_total", kind="resume") == 1
        assert value(m2, "guildcast_admission_refused_total", kind="handshake") == busy
        assert value(m2, "guildcast_admission_refused_total", kind="fresh") == 0
        assert value(m2, "guildcast_admission_queue_depth") == 0
        assert value(m2, "guildcast_closes_total", code="1013") == busy
        # A loop 1 s late halves the rate admitted (at most: MIN_SHARE).
        slowdowns = value(m2, "guildcast_admission_slowdowns_total")
        adm.loop_lag(1.0)
        m3 = render(srv)
        assert value(m3, "guildcast_admission_rate") == 0.5
        assert value(m3, "guildcast_admission_slowdowns_total") == slowdowns + 1
        for ws in (ws_a, ws_b, ws_r, *flood):
            await ws.close()
