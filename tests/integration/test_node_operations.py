"""What an operator relies on (issue "First run and operations"): read-only
API calls that start no guild actor, health and readiness on the gateway
port, the demo page switched off, ``/favicon.ico``, ``--node-id`` without
Redis, a per-node API listener and metrics labelled with their node, and the
README's claim about epochs and idle guilds."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from guildcast import Config, Server
from guildcast.client import Client
from tests.clients.test_demo_static import http_get
from tests.support.api import Api
from tests.support.gateway import subscribe
from tests.support.node import SECRET, api_server
from tests.support.wait import until


async def test_read_only_calls_start_no_guild_actor(tmp_path: Path) -> None:
    for extra in ({}, {"data_dir": str(tmp_path / "data")}):
        async with api_server(max_guilds=1, **extra) as srv, Api(srv.api_url) as api:
            for gid in ("never-seen", "also-new", "third"):
                status, info, _ = await api.get(f"/v1/guilds/{gid}")
                assert status == 200, info
                assert info["s"] == 0 and info["subscribers"] == 0
                assert info["history"]["max_count"] == srv.config.history_size
                status, page, _ = await api.get(f"/v1/guilds/{gid}/history?after=0")
                assert status == 200, page
                assert page["events"] == []
            # None of them started an actor or took the one max_guilds slot.
            assert len(srv.registry) == 0 and srv.registry.started == 0
            status, _, _ = await api.publish({"guild": "live", "t": "E", "d": {"i": 1}})
            assert status == 200
            # A guild that is alive answers as before (same epoch, same history).
            status, live, _ = await api.get("/v1/guilds/live")
            assert live["s"] == 1
            await srv.registry.stop_all()
            assert len(srv.registry) == 0
            # Gone from the node, its history is still read from the broker.
            status, page, _ = await api.get("/v1/guilds/live/history?after=0")
            assert page["epoch"] == live["epoch"] and page["s"] == 1
            assert [e["d"] for e in page["events"]] == [{"i": 1}]
            assert len(srv.registry) == 0


async def test_healthz_readyz_favicon_on_the_gateway_port() -> None:
    async with Server(Config(port=0, secret=SECRET)) as srv:  # no HTTP API at all
        status, hdrs, body = await http_get(srv.port, "/healthz")
        assert status == 200 and orjson.loads(body) == {"status": "ok"}
        assert hdrs["content-type"] == "application/json"
        status, _, body = await http_get(srv.port, "/readyz")
        assert status == 200 and orjson.loads(body) == {"ready": True}
        status, _, body = await http_get(srv.port, "/favicon.ico")
        assert status == 204 and body == b""
        status, _, body = await http_get(srv.port, "/")
        assert status == 200 and b"Guildcast board" in body
        # While it drains the gateway port says so: a load balancer stops sending.
        srv.draining = True
        status, _, body = await http_get(srv.port, "/readyz")
        assert status == 503 and orjson.loads(body) == {"ready": False, "detail": "draining"}
        srv.draining = False
        # The WebSocket path is unchanged.
        async with Client(srv.url, srv.token("u", guilds=["*"])) as c:
            assert c.connected


async def test_demo_page_can_be_turned_off() -> None:
    async with Server(Config(port=0, secret=SECRET, demo_page=False)) as srv:
        for path in ("/", "/demo"):
            status, _, _ = await http_get(srv.port, path)
            assert status == 404, path
        status, hdrs, _ = await http_get(srv.port, "/guildcast.js")  # applications import it
        assert status == 200 and hdrs["content-type"].startswith("text/javascript")
        status, _, _ = await http_get(srv.port, "/healthz")
        assert status == 200


async def test_node_id_without_redis_is_the_presence_node() -> None:
    for node_id, expected in (("edge-7", "edge-7"), (None, "local")):
        async with api_server(node_id=node_id) as srv, Api(srv.api_url) as api:
            ws, _ = await subscribe(srv.url, srv.token("ann", guilds=["*"]), "room")
            try:
                members: list[dict[str, str]] = []

                async def read() -> None:
                    nonlocal members
                    _, body, _ = await api.get("/v1/guilds/room/presence")
                    members = body["members"]

                for _ in range(2000):  # bounded poll: the join is asynchronous
                    await read()
                    if members:
                        break
                    await asyncio.sleep(0.01)
                assert [(m["user"], m["node"]) for m in members] == [("ann", expected)]
            finally:
                await ws.close()


def samples(text: str) -> list[tuple[str, dict[str, str]]]:
    return [(s.name, s.labels) for fam in text_string_to_metric_families(text) for s in fam.samples]


async def test_node_api_port_and_node_labelled_metrics() -> None:
    cfg = {"node_id": "worker-a", "node_api_port": 0, "metrics_node_label": True}
    async with api_server(**cfg) as srv:
        assert srv.node_api_port not in (0, srv.api_port)
        own = f"http://127.0.0.1:{srv.node_api_port}"
        async with Api(srv.api_url) as shared, Api(own) as mine:
            for api in (shared, mine):
                status, body, _ = await api.get("/metrics")
                assert status == 200
                found = samples(body.decode())
                assert len(found) > 20
                assert all(labels.get("node") == "worker-a" for _, labels in found), found
                status, body, _ = await api.get("/readyz")
                assert status == 200
    # Without the setting the series are as before: no node label.
    async with api_server() as srv, Api(srv.api_url) as api:
        _, body, _ = await api.get("/metrics")
        assert all("node" not in labels for _, labels in samples(body.decode()))
        assert srv.node_api_port == 0


async def test_history_outlives_the_guild_actor_same_epoch() -> None:
    """README: an idle guild's actor stops, its history and epoch stay (within
    ``history_ttl``): a client coming back recovers what it missed."""
    async with api_server(idle_timeout=0.2) as srv:
        tok = srv.token("u", guilds=["*"])
        ws, sub = await subscribe(srv.url, tok, "quiet")
        epoch = sub["epoch"]
        await ws.close()
        s = await srv.publish("quiet", "E", {"i": 1})
        await until(lambda: srv.registry.lookup("quiet") is None, "the guild to idle out")
        ws, sub = await subscribe(srv.url, tok, "quiet", {"epoch": epoch, "s": 0})
        try:
            assert sub["epoch"] == epoch and sub["recovered"] is True
            assert sub["s"] == s
        finally:
            await ws.close()


@pytest.mark.parametrize(
    "cfg", [Config(port=0, secret=""), Config(port=0, secret=SECRET, api_keys=("",))]
)
def test_an_embedded_empty_secret_or_key_is_refused(cfg: Config) -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        Server(cfg)
