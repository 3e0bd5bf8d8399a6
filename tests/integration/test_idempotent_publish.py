"""Idempotent publish (PROTOCOL.md "Idempotent publish", protocol 1.1), end to
end over real sockets: HTTP publishes retried with their key, the same
across a kill -9 and restart with ``--data-dir`` (a real ``guildcast
serve`` process), gateway PUBLISH retried by a plain ``websockets`` client,
bad keys refused, concurrent publishes of one key sequenced once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection

from guildcast.core.host import KeyConflict
from guildcast.core.tokens import make_token
from tests.support.api import Api
from tests.support.gateway import ACK, DISPATCH, ERROR, PUBLISH, recv, send, session, subscribe
from tests.support.node import SECRET, api_server, serve_process
from tests.support.wait import TIMEOUT, until

WATCHER = make_token(SECRET, "watcher", ["*"], [], None, 3600)
PUBLISHER = make_token(SECRET, "pub", ["*"], ["*"], pub_rate=0)
N = 1000
#: HTTP publishes in flight at once (the retries race their originals).
CONCURRENCY = 32


def event(gid: str, i: int, key: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"guild": gid, "t": "ORDER", "d": {"i": i}}
    body["idempotency_key"] = key if key is not None else f"order-{i}"
    return body


async def publish_each_twice(api: Api, gid: str, n: int) -> dict[int, tuple[int, str]]:
    """Publish events 0..n-1, each retried once with its key: half the
    retries race their original (both in flight), half follow its answer.
    Asserts every retry got the original's ``s`` and epoch; returns them."""
    sem = asyncio.Semaphore(CONCURRENCY)
    answers: dict[int, tuple[int, str]] = {}

    async def one(i: int) -> None:
        async with sem:
            if i % 2:
                (st1, b1, _), (st2, b2, _) = await asyncio.gather(
                    api.publish(event(gid, i)), api.publish(event(gid, i))
                )
            else:
                st1, b1, _ = await api.publish(event(gid, i))
                st2, b2, _ = await api.publish(event(gid, i))
        assert (st1, st2) == (200, 200), (b1, b2)
        assert (b2["s"], b2["epoch"]) == (b1["s"], b1["epoch"]), (i, b1, b2)
        answers[i] = (b1["s"], b1["epoch"])

    await asyncio.gather(*(one(i) for i in range(n)))
    return answers


async def read_events(ws: ClientConnection, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < n:
        m = await recv(ws)
        if m["op"] == DISPATCH and "s" in m:
            out.append(m)
    return out


async def check_seen_once(
    ws: ClientConnection, api: Api, gid: str, answers: dict[int, tuple[int, str]]
) -> None:
    """The subscriber gets each event exactly once, with the ``s`` its
    publisher was told, and nothing more: the next event after them is a
    sentinel published last, numbered right after them."""
    got = await read_events(ws, len(answers))
    assert [m["s"] for m in got] == list(range(1, len(answers) + 1))
    assert sorted(m["d"]["i"] for m in got) == sorted(answers)
    assert {m["d"]["i"]: m["s"] for m in got} == {i: s for i, (s, _) in answers.items()}
    status, body, _ = await api.publish({"guild": gid, "t": "END", "d": None})
    assert status == 200 and body["s"] == len(answers) + 1
    (last,) = await read_events(ws, 1)
    assert (last["t"], last["s"]) == ("END", len(answers) + 1)


async def test_http_publishes_retried_with_their_key_are_sequenced_once() -> None:
    async with api_server(api_publish_rate=0) as srv, Api(srv.api_url) as api:
        ws, sub = await subscribe(srv.url, WATCHER, "shop")
        try:
            answers = await publish_each_twice(api, "shop", N)
            assert {e for _, e in answers.values()} == {sub["epoch"]}
            status, info, _ = await api.get("/v1/guilds/shop")
            assert status == 200 and info["s"] == N
            await check_seen_once(ws, api, "shop", answers)
        finally:
            await ws.close()


async def test_kill_9_and_restart_keep_the_window(tmp_path: Path) -> None:
    """``--data-dir``: 1,000 keyed publishes (each retried once), a kill -9
    while more are in flight, a restart; every key published again is
    answered with its original ``s`` and epoch, and each event is in the
    guild once, as a plain subscriber recovering from (epoch, 0) sees."""
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--api-publish-rate", "0"]
    gid = "orders"
    async with serve_process(args, tmp_path / "run1.log") as node:
        ws, sub = await subscribe(node.url, WATCHER, gid)
        epoch = sub["epoch"]
        async with Api(node.api_url) as api:
            answers = await publish_each_twice(api, gid, N)
            await check_seen_once(ws, api, gid, answers)  # s 1..1000, then END as 1001
            await ws.close()
            # More keyed publishes in flight when the node is killed: each
            # was sequenced or not; its retry after the restart must tell.
            flying = [asyncio.create_task(api.publish(event(gid, i))) for i in range(N, N + 200)]
            # Killed once some are answered: the rest are in flight or queued.
            await until(lambda: sum(t.done() for t in flying) >= 20, "answers before the kill")
            await node.kill()
            done = await asyncio.gather(*flying, return_exceptions=True)
        acked_in_flight = {
            N + k: (r[1]["s"], r[1]["epoch"])
            for k, r in enumerate(done)
            if not isinstance(r, BaseException) and r[0] == 200
        }
        await node.start()
        async with Api(node.api_url) as api:
            status, info, _ = await api.get(f"/v1/guilds/{gid}")
            # In flight at the kill: some answered, some sequenced unanswered.
            head = info["s"]
            assert head - (N + 1) >= len(acked_in_flight)
            again = await publish_each_twice(api, gid, N + 200)
            # Every one sequenced before the kill, answered or not, kept its s.
            kept = {i for i in range(N, N + 200) if again[i][0] <= head}
            assert len(kept) == head - (N + 1)
            for i, original in {**answers, **acked_in_flight}.items():
                assert again[i] == original, (i, again[i], original)
            assert {e for _, e in again.values()} == {epoch}  # a kill -9 keeps the epoch
            # Each of the 1,200 keys is in the guild once, plus END: s 1..1201.
            status, info, _ = await api.get(f"/v1/guilds/{gid}")
            assert status == 200 and info["s"] == N + 200 + 1
            status, page, _ = await api.get(f"/v1/guilds/{gid}/history?after={N + 1}&limit=1000")
            assert status == 200
            assert sorted(e["d"]["i"] for e in page["events"]) == list(range(N, N + 200))
        # A plain subscriber recovering from the start of the epoch: the
        # last 1,000 events (the history bound), each once, in order.
        ws, sub = await subscribe(node.url, WATCHER, gid, {"epoch": epoch, "s": 201})
        try:
            assert sub == {"epoch": epoch, "s": N + 201, "recovered": True}
            got = await read_events(ws, N)
            assert [m["s"] for m in got] == list(range(202, N + 202))
            ids = [m["d"]["i"] for m in got if m["t"] == "ORDER"]
            assert len(ids) == len(set(ids)) == N - 1  # and END
        finally:
            await ws.close()


async def test_gateway_publish_retried_with_its_key() -> None:
    """A plain websockets publisher: the retry is ACKed with the original s
    and epoch; the key with other data is ERROR 4409; a subscriber sees the
    event once."""
    async with api_server() as srv:
        watcher, _ = await subscribe(srv.url, WATCHER, "room")
        pub, _ = await session(srv.url, PUBLISHER)
        try:
            body = {"guild": "room", "t": "MSG", "d": {"text": "hi"}, "idempotency_key": "m-1"}
            await send(pub, PUBLISH, {**body, "nonce": "1"})
            ack1 = await recv(pub)
            assert ack1["op"] == ACK and ack1["d"]["nonce"] == "1", ack1
            await send(pub, PUBLISH, {**body, "nonce": "2"})
            ack2 = await recv(pub)
            assert ack2["op"] == ACK and ack2["d"]["nonce"] == "2", ack2
            assert (ack2["d"]["s"], ack2["d"]["epoch"]) == (ack1["d"]["s"], ack1["d"]["epoch"])
            await send(pub, PUBLISH, {**body, "d": {"text": "other"}, "nonce": "3"})
            err = await recv(pub)
            assert err["op"] == ERROR and err["d"]["code"] == 4409 and err["d"]["nonce"] == "3"
            # 1.0 frames (no key) are untouched: a new event each time.
            await send(pub, PUBLISH, {"guild": "room", "t": "MSG", "d": 2, "nonce": "4"})
            ack4 = await recv(pub)
            assert ack4["op"] == ACK and ack4["d"]["s"] == ack1["d"]["s"] + 1
            got = await read_events(watcher, 2)
            assert [(m["s"], m["d"]) for m in got] == [(1, {"text": "hi"}), (2, 2)]
        finally:
            await pub.close()
            await watcher.close()


@pytest.mark.parametrize("key", ["", "a b", "tab\tkey", "café", "k" * 129, 7, ["k"], {"k": 1}])
async def test_bad_keys_are_refused_on_both_paths(key: Any) -> None:
    async with api_server() as srv, Api(srv.api_url) as api:
        status, body, _ = await api.publish(event("g", 1, key))
        assert status == 400 and body["error"] == "invalid_idempotency_key", body
        batch = {"events": [event("g", 1), event("g", 2, key)]}
        status, body, _ = await api.publish(batch)
        assert status == 400 and body["error"] == "invalid_idempotency_key", body
        assert "events[1]" in body["detail"]
        pub, _ = await session(srv.url, PUBLISHER)
        try:
            await send(pub, PUBLISH, {**event("g", 1, key), "nonce": "1"})
            err = await recv(pub)
            assert err["op"] == ERROR and err["d"]["code"] == 4422, err
            assert err["d"]["nonce"] == "1" and "idempotency_key" in err["d"]["message"]
            # The connection stays and serves the next PUBLISH.
            await send(pub, PUBLISH, {**event("g", 1), "nonce": "2"})
            ack = await recv(pub)
            assert ack["op"] == ACK and ack["d"]["s"] == 1, ack
        finally:
            await pub.close()
        with pytest.raises(ValueError):
            await srv.publish("g", "ORDER", 1, idempotency_key=key)  # type: ignore[arg-type]
        assert (await srv.head("g"))[1] == 1  # nothing refused was sequenced


async def test_http_conflict_and_repeats_within_a_batch() -> None:
    async with api_server() as srv, Api(srv.api_url) as api:
        status, first, _ = await api.publish(event("g", 1, "k"))
        assert status == 200
        status, body, _ = await api.publish(event("g", 2, "k"))
        assert status == 409 and body["error"] == "idempotency_conflict", body
        assert (body["s"], body["epoch"]) == (first["s"], first["epoch"])
        batch = {"events": [event("g", 3, "a"), event("g", 3, "a"), event("g", 4, "b")]}
        status, body, _ = await api.publish(batch)
        assert status == 200
        assert [r["s"] for r in body] == [2, 2, 3]
        # A batch holding a conflict: 409, each event's fate in the results.
        batch = {"events": [event("g", 5, "c"), event("g", 9, "a")]}
        status, body, _ = await api.publish(batch)
        assert status == 409 and body["error"] == "idempotency_conflict", body
        ok, conflict = body["results"]
        assert ok["s"] == 4
        assert conflict["error"] == "idempotency_conflict" and conflict["s"] == 2
        assert conflict["outcome"] == "not_published"
        # The embedded API follows the same window.
        assert await srv.publish("g", "ORDER", {"i": 5}, idempotency_key="c") == 4
        with pytest.raises(KeyConflict):
            await srv.publish("g", "ORDER", {"i": 6}, idempotency_key="c")
        assert (await srv.head("g"))[1] == 4
        status, text, _ = await api.get("/metrics")
        assert status == 200
        lines = text.decode().splitlines()
        assert "guildcast_publish_replays_total 2.0" in lines  # the batch's repeat, "c"
        assert "guildcast_publish_conflicts_total 3.0" in lines


async def test_concurrent_publishes_of_one_key_sequence_once() -> None:
    """50 HTTP requests and 20 pipelined gateway PUBLISHes of one key, all
    in flight together: one event, every answer its s."""
    async with api_server(api_publish_rate=0) as srv, Api(srv.api_url) as api:
        watcher, _ = await subscribe(srv.url, WATCHER, "race")
        pub, _ = await session(srv.url, PUBLISHER)
        try:
            body = event("race", 1, "the-one")
            for n in range(20):
                await send(pub, PUBLISH, {**body, "nonce": str(n)})
            http = await asyncio.gather(*(api.publish(body) for _ in range(50)))
            acks = [await recv(pub) for _ in range(20)]
            assert {(st, b["s"]) for st, b, _ in http} == {(200, 1)}
            assert {(a["op"], a["d"]["s"]) for a in acks} == {(ACK, 1)}
            status, _, _ = await api.publish({"guild": "race", "t": "END", "d": None})
            assert status == 200
            got = await read_events(watcher, 2)
            assert [(m["t"], m["s"]) for m in got] == [("ORDER", 1), ("END", 2)]
        finally:
            await pub.close()
            await watcher.close()


async def test_unknown_fields_are_still_refused() -> None:
    async with api_server() as srv, Api(srv.api_url) as api:
        status, body, _ = await api.publish({**event("g", 1), "nonce": "x"})
        assert status == 400 and body["error"] == "bad_shape"


async def test_the_openapi_document_describes_the_key() -> None:
    async with api_server() as srv:
        async with aiohttp.ClientSession() as http:
            async with http.get(srv.api_url + "/openapi.json", timeout=TIMEOUT) as r:
                doc = await r.json()
        event_schema = doc["components"]["schemas"]["Event"]
        key = event_schema["properties"]["idempotency_key"]
        assert key["type"] == ["string", "null"] and key["maxLength"] == 128
        assert "409" in doc["paths"]["/v1/publish"]["post"]["responses"]
