"""The HTTP API against a real embedded node: publishing reaches WebSocket
subscribers, batches keep their order, and every documented error comes
from the input that should cause it (server/transport/http_api.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from guildcast import Server
from tests.support.api import KEY, Api
from tests.support.gateway import recv, subscribe
from tests.support.node import api_server
from tests.support.wait import TIMEOUT


@pytest.fixture
async def srv() -> Any:
    async with api_server(api_publish_rate=0) as s:
        yield s


@pytest.fixture
async def api(srv: Server) -> Any:
    async with Api(srv.api_url) as a:
        yield a


async def test_publish_reaches_websocket_subscribers(srv: Server, api: Api) -> None:
    tok = srv.token("u", guilds=["*"])
    ws, sub = await subscribe(srv.url, tok, "room")
    try:
        status, body, _ = await api.publish({"guild": "room", "t": "MSG", "d": {"text": "hi"}})
        assert status == 200
        assert body == {"g": "room", "s": 1, "epoch": sub["epoch"]}
        ev = await recv(ws)
        assert ev == {"op": 0, "t": "MSG", "g": "room", "s": 1, "d": {"text": "hi"}}
        # d may be absent (null) or any JSON value
        status, body, _ = await api.publish({"guild": "room", "t": "PING"})
        assert status == 200 and body["s"] == 2
        assert (await recv(ws))["d"] is None
    finally:
        await ws.close()


async def test_a_batch_keeps_its_order(srv: Server, api: Api) -> None:
    tok = srv.token("u", guilds=["*"])
    wa, _ = await subscribe(srv.url, tok, "a")
    wb, _ = await subscribe(srv.url, tok, "b")
    try:
        events = [{"guild": "a" if i % 3 else "b", "t": "N", "d": i} for i in range(60)]
        status, acks, _ = await api.publish({"events": events})
        assert status == 200 and isinstance(acks, list) and len(acks) == 60
        assert [a["g"] for a in acks] == [e["guild"] for e in events]
        for gid, ws in (("a", wa), ("b", wb)):
            mine = [(a["s"], e["d"]) for a, e in zip(acks, events, strict=True) if a["g"] == gid]
            assert [s for s, _ in mine] == list(range(1, len(mine) + 1))
            got = [await recv(ws) for _ in mine]
            assert [(m["s"], m["d"]) for m in got] == mine
    finally:
        await wa.close()
        await wb.close()


async def test_guild_info_and_history(srv: Server, api: Api) -> None:
    for i in range(5):
        await api.publish({"guild": "h", "t": "E", "d": i})
    status, info, _ = await api.get("/v1/guilds/h")
    assert status == 200
    assert info["guild"] == "h" and info["s"] == 5 and info["subscribers"] == 0
    assert info["history"]["first"] == 1 and info["history"]["last"] == 5
    assert info["history"]["max_count"] == srv.config.history_size

    status, page, _ = await api.get("/v1/guilds/h/history?after=2&limit=2")
    assert status == 200
    assert page["epoch"] == info["epoch"] and page["s"] == 5 and page["complete"] is True
    assert page["events"] == [
        {"op": 0, "t": "E", "g": "h", "s": 3, "d": 2},
        {"op": 0, "t": "E", "g": "h", "s": 4, "d": 3},
    ]
    status, page, _ = await api.get("/v1/guilds/h/history")
    assert [e["s"] for e in page["events"]] == [1, 2, 3, 4, 5]
    status, page, _ = await api.get("/v1/guilds/h/history?after=5")
    assert page["events"] == [] and page["complete"] is True
    status, page, _ = await api.get("/v1/guilds/never-used")
    assert status == 200 and page["s"] == 0 and page["history"]["first"] is None


async def test_history_tells_when_events_are_gone() -> None:
    async with api_server(history_size=3) as srv, Api(srv.api_url) as api:
        for i in range(6):
            await api.publish({"guild": "small", "t": "E", "d": i})
        status, page, _ = await api.get("/v1/guilds/small/history?after=1")
        assert status == 200 and page["first"] == 4
        assert page["complete"] is False  # 2 and 3 are gone: reload state
        assert [e["s"] for e in page["events"]] == [4, 5, 6]
        _, page, _ = await api.get("/v1/guilds/small/history?after=3")
        assert page["complete"] is True


async def test_open_endpoints(srv: Server) -> None:
    async with Api(srv.api_url, key=None) as anon:
        assert (await anon.get("/healthz"))[:2] == (200, {"status": "ok"})
        assert (await anon.get("/readyz"))[:2] == (200, {"ready": True})
        status, doc, _ = await anon.get("/openapi.json")
        assert status == 200 and doc["openapi"].startswith("3.1")
        assert set(doc["paths"]) >= {"/v1/publish", "/v1/guilds/{gid}", "/metrics"}


# --- errors ------------------------------------------------------------------


async def test_auth_errors(srv: Server) -> None:
    body = {"guild": "g", "t": "E"}
    async with Api(srv.api_url, key=None) as anon:
        for path, method in (("/v1/publish", "POST"), ("/v1/guilds/g", "GET")):
            status, err, headers = await anon.request(method, path, json=body)
            assert status == 401 and err["error"] == "unauthorized", err
            assert headers["WWW-Authenticate"].startswith("Bearer")
        status, err, _ = await anon.publish(body, headers={"Authorization": "Basic dXNlcjpwdw=="})
        assert status == 401 and "Bearer" in err["detail"]
        status, err, _ = await anon.publish(body, headers={"Authorization": "Bearer"})
        assert status == 401
        status, err, _ = await anon.get("/metrics")
        assert status == 401  # not open unless --metrics-open
    async with Api(srv.api_url, key="not-a-key") as wrong:
        status, err, _ = await wrong.publish(body)
        assert status == 403 and err == {"error": "forbidden", "detail": "unknown API key"}
        assert (await wrong.get("/v1/guilds/g/history"))[0] == 403


async def test_keys_are_any_of_the_configured_ones() -> None:
    async with api_server(api_keys=("k-one", "k-two")) as srv:
        for key in ("k-one", "k-two"):
            async with Api(srv.api_url, key=key) as api:
                assert (await api.publish({"guild": "g", "t": "E"}))[0] == 200
        async with Api(srv.api_url, key=KEY) as api:
            assert (await api.publish({"guild": "g", "t": "E"}))[0] == 403


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ([{"guild": "g", "t": "E"}], "bad_shape"),
        ("just a string", "bad_shape"),
        ({"guild": "g"}, "invalid_event"),
        ({"t": "E"}, "invalid_guild"),
        ({"guild": "", "t": "E"}, "invalid_guild"),
        ({"guild": "a/b", "t": "E"}, "invalid_guild"),
        ({"guild": "x" * 129, "t": "E"}, "invalid_guild"),
        ({"guild": 7, "t": "E"}, "invalid_guild"),
        ({"guild": "g", "t": "lower"}, "invalid_event"),
        ({"guild": "g", "t": "E" * 65}, "invalid_event"),
        ({"guild": "g", "t": "READY"}, "reserved_event"),
        ({"guild": "g", "t": "SUBSCRIBED"}, "reserved_event"),
        ({"guild": "g", "t": "UNSUBSCRIBED"}, "reserved_event"),
        ({"guild": "g", "t": "E", "nonce": "1"}, "bad_shape"),
        ({"events": []}, "bad_shape"),
        ({"events": {"guild": "g"}}, "bad_shape"),
        ({"events": [{"guild": "g", "t": "E"}], "more": 1}, "bad_shape"),
        ({"events": [{"guild": "g", "t": "E"}, {"guild": "g", "t": "READY"}]}, "reserved_event"),
        ({"events": [{"guild": "g", "t": "E"}, "x"]}, "bad_shape"),
    ],
)
async def test_bad_bodies_are_400(srv: Server, api: Api, body: Any, error: str) -> None:
    status, err, _ = await api.publish(body)
    assert status == 400, err
    assert err["error"] == error and isinstance(err["detail"], str) and err["detail"]
    # nothing was published, not even the valid events of a bad batch
    assert (await api.get("/v1/guilds/g"))[1]["s"] == 0


async def test_not_json_and_wrong_content_type(api: Api) -> None:
    ctype = {"Content-Type": "application/json"}
    for raw in (b"{", b"", b"\xff\xfe", b"NaN", b'{"guild": "g", "t": "E"} trailing'):
        status, err, _ = await api.request("POST", "/v1/publish", data=raw, headers=ctype)
        assert (status, err["error"]) == (400, "bad_json"), raw
    for other in ("text/plain", "application/x-www-form-urlencoded", "application/jsonx"):
        status, err, _ = await api.request(
            "POST", "/v1/publish", data=b'{"guild":"g","t":"E"}', headers={"Content-Type": other}
        )
        assert (status, err["error"]) == (415, "unsupported_media_type"), other
    status, err, _ = await api.request("POST", "/v1/publish", data=b'{"guild":"g","t":"E"}')
    assert status == 415  # no content type at all
    ok = {"Content-Type": "application/json; charset=utf-8"}
    assert (await api.request("POST", "/v1/publish", data=b'{"guild":"g","t":"E"}', headers=ok))[
        0
    ] == 200


async def test_size_limits_are_413() -> None:
    async with api_server(api_max_body=4096, max_payload=100) as srv, Api(srv.api_url) as api:
        status, err, _ = await api.publish({"guild": "g", "t": "E", "d": "x" * 5000})
        assert (status, err["error"]) == (413, "payload_too_large")

        async def chunks() -> Any:  # no Content-Length: the limit holds while reading
            for _ in range(10):
                yield b" " * 1000
            yield b'{"guild": "g", "t": "E"}'

        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        async with api.session.post(
            srv.api_url + "/v1/publish", data=chunks(), headers=headers
        ) as r:
            assert r.status == 413
            assert (await r.json())["error"] == "payload_too_large"

        status, err, _ = await api.publish({"guild": "g", "t": "E", "d": "y" * 101})
        assert (status, err["error"]) == (413, "payload_too_large")
        assert "over 100" in err["detail"]
        batch = {
            "events": [{"guild": "g", "t": "E", "d": 1}, {"guild": "g", "t": "E", "d": "z" * 200}]
        }
        status, err, _ = await api.publish(batch)
        assert status == 413 and err["detail"].startswith("events[1]")
        assert (await api.publish({"guild": "g", "t": "E", "d": "y" * 90}))[0] == 200


async def test_batch_limit_is_400() -> None:
    async with api_server(api_max_batch=5) as srv, Api(srv.api_url) as api:
        events = [{"guild": "g", "t": "E"}] * 6
        status, err, _ = await api.publish({"events": events})
        assert (status, err["error"]) == (400, "batch_too_large")
        assert (await api.publish({"events": events[:5]}))[0] == 200


async def test_publish_rate_per_key_is_429() -> None:
    keys = ("slow-key", "other-key")
    async with api_server(api_keys=keys, api_publish_rate=5) as srv:
        async with Api(srv.api_url, key="slow-key") as api:
            # a burst of one second's worth, then refused with a Retry-After
            statuses = [(await api.publish({"guild": "g", "t": "E"}))[0] for _ in range(5)]
            assert statuses == [200] * 5
            status, err, headers = await api.publish({"guild": "g", "t": "E"})
            assert (status, err["error"]) == (429, "rate_limited")
            assert int(headers["Retry-After"]) >= 1
            # a batch counts each event
            status, _, _ = await api.publish({"events": [{"guild": "g", "t": "E"}] * 3})
            assert status == 429
        async with Api(srv.api_url, key="other-key") as other:  # buckets are per key
            assert (await other.publish({"guild": "g", "t": "E"}))[0] == 200
        async with Api(srv.api_url, key="slow-key") as api:
            statuses = []
            for _ in range(int(TIMEOUT / 0.1)):  # the bucket refills
                statuses.append((await api.publish({"guild": "g", "t": "E"}))[0])
                if statuses[-1] == 200:
                    break
                await asyncio.sleep(0.1)
            assert statuses[-1] == 200 and set(statuses) <= {200, 429}


async def test_an_overloaded_guild_is_503_with_what_was_published() -> None:
    # A guild mailbox of 3: a batch of 6 to one guild overflows it midway.
    async with api_server(guild_mailbox=3) as srv, Api(srv.api_url) as api:
        events = [{"guild": "busy", "t": "E", "d": i} for i in range(6)]
        status, err, headers = await api.publish({"events": events})
        assert status == 503 and err["error"] == "unavailable"
        assert headers["Retry-After"] == "1"  # the failure table's row (core/failures.py)
        results = err["results"]
        assert [r.get("s") for r in results[:3]] == [1, 2, 3]
        assert results[3]["error"] == "unavailable"
        assert [r["error"] for r in results[4:]] == ["not_published", "not_published"]
        _, page, _ = await api.get("/v1/guilds/busy/history")
        assert [e["d"] for e in page["events"]] == [0, 1, 2]  # exactly the acknowledged ones
        status, err, _ = await api.get("/v1/guilds/busy/history?after=0&limit=1")
        assert status == 200


async def test_bad_paths_and_queries(api: Api) -> None:
    for path in ("/v1/guilds/a%2Fb", "/v1/guilds/" + "x" * 129, "/v1/guilds/a%20b/history"):
        status, err, _ = await api.get(path)
        assert (status, err["error"]) == (400, "invalid_guild"), path
    for query in ("after=-1", "after=x", "after=%2B1", "after=1_0", "limit=0", "limit=1001"):
        status, err, _ = await api.get(f"/v1/guilds/g/history?{query}")
        assert (status, err["error"]) == (400, "bad_query"), query
    status, err, _ = await api.get("/nowhere")
    assert (status, err["error"]) == (404, "not_found")
    status, err, headers = await api.request("DELETE", "/v1/publish")
    assert (status, err["error"]) == (405, "method_not_allowed")
    assert "POST" in headers["Allow"]


async def test_never_a_500_for_garbage(api: Api) -> None:
    ctype = {"Content-Type": "application/json"}
    bodies: list[bytes] = [
        b"null",
        b"0",
        b"[]",
        b'{"events": [null]}',
        b'{"events": [[]]}',
        b'{"guild": null, "t": null}',
        b'{"guild": ["g"], "t": "E"}',
        b'{"guild": "g", "t": "E", "d": ' + b"[" * 200 + b"]" * 200 + b"}",
        b'{"guild": "g", "t": "E", "d": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"guild": "g", "t": "E", "d": 18446744073709551616}',
        b'{"guild": "g", "t": "E", "d": -1180591620717411303424}',
        b'{"guild": "g", "t": "E", "d": 1.5e308}',
        b'{"guild": "g", "t": "E", "d": 1e999}',
        b'{"guild": "g", "t": "E", "d": "\\u0000\\ud800"}',
        b'{"guild": "g\\u0000", "t": "E"}',
        b'{"guild": "g", "guild": "h", "t": "E"}',
    ]
    for body in bodies:
        status, err, _ = await api.request("POST", "/v1/publish", data=body, headers=ctype)
        assert status in (200, 400), (body[:80], status, err)
