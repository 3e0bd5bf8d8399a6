"""HTTP API abuse, each while the API keeps serving a good publisher and the
gateway keeps delivering its events (server/transport/http_api.py).

Beyond tests/transport/test_http_api.py (one request per error code), these
go through raw sockets where a client library would not: a declared body
of 100 MiB (413 before reading it), a chunked body that never says its
length (413 once past ``api_max_body``), bodies and headers trickled slowly
(408 after ``api_body_timeout``; closed after ``api_idle_timeout``), idle
connections, and a flood of malformed requests of every kind at once. None
is a 500, none slows the good publisher past the bound, and the server logs
nothing at ERROR.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest

from guildcast import Server
from tests.hardening import support
from tests.hardening.support import nested
from tests.support.api import KEY
from tests.support.node import api_server

TIMEOUT = support.TIMEOUT


async def http_raw(port: int, data: bytes, *, eof: bool = False) -> tuple[int, bytes]:
    """Send ``data`` on a fresh connection; returns (status, body head) of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        if eof:
            writer.write_eof()
        async with asyncio.timeout(TIMEOUT):
            head = await reader.readuntil(b"\r\n\r\n")
            rest = await reader.read(4096)
        return int(head.split(b" ", 2)[1]), rest
    finally:
        writer.close()


def post(body: bytes, ctype: str | None = "application/json", key: str | None = KEY) -> bytes:
    lines = ["POST /v1/publish HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    if ctype is not None:
        lines.append(f"Content-Type: {ctype}")
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class GoodPublisher:
    """Publishes over HTTP (one session for its life) while gateway clients
    receive; records each publish's round trip."""

    def __init__(self, srv: Server) -> None:
        self.srv = srv
        self.rtts: list[float] = []
        self.http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=TIMEOUT),
            headers={"Authorization": f"Bearer {KEY}"},
        )

    async def __aenter__(self) -> GoodPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    async def __call__(self, d: dict[str, Any]) -> int:
        t0 = time.monotonic()
        async with self.http.post(
            self.srv.api_url + "/v1/publish",
            json={"guild": "stream", "t": "TICK", "d": d},
        ) as r:
            assert r.status == 200, (r.status, await r.text())
            body = await r.json()
        self.rtts.append(time.monotonic() - t0)
        return int(body["s"])


@asynccontextmanager
async def serving(srv: Server) -> AsyncIterator[GoodPublisher]:
    """A good HTTP publisher (40 events/s) and 5 gateway readers run during
    the block; on exit every event reached every reader and the publisher's
    p99 round trip and the readers' p99 latency are under the bound."""
    stream = support.Stream(srv.url, srv.token("good", guilds=["stream"]), "stream", 5)
    await stream.connect()
    # The good path is running (2 events everywhere) before the attack starts.
    async with GoodPublisher(srv) as good, stream.feeding(good, 40.0, warm=2):
        yield good
    assert len(good.rtts) >= 2, good.rtts
    assert support.percentile(good.rtts, 0.99) < support.P99_BOUND, good.rtts
    assert support.percentile(stream.latency["attack"], 0.99) < support.P99_BOUND
    await stream.close()


@pytest.fixture
def no_errors(caplog: pytest.LogCaptureFixture) -> Any:
    caplog.set_level(logging.INFO)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


async def test_huge_bodies_are_413(no_errors: None) -> None:
    async with api_server(api_max_body=64 * 1024, api_publish_rate=0) as srv, serving(srv):
        port = srv.api_port
        # Declared far over the limit: answered without reading it.
        head = post(b"")[: -len(b"\r\n\r\n")].replace(
            b"Content-Length: 0", b"Content-Length: 104857600"
        )
        status, _ = await http_raw(port, head + b"\r\n\r\n" + b"{" * 1000)
        assert status == 413
        # Chunked, no length: refused once past the limit.
        chunk = b"x" * 8192
        chunked = (
            b"POST /v1/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + (b"2000\r\n" + chunk + b"\r\n") * 12
            + b"0\r\n\r\n"
        )
        status, body = await http_raw(port, chunked)
        assert status == 413, body
        # Many at once.
        statuses = await asyncio.gather(
            *(
                http_raw(port, post(b'{"guild":"g","t":"E","d":"' + b"y" * 70_000 + b'"}'))
                for _ in range(30)
            )
        )
        assert {s for s, _ in statuses} == {413}


async def test_slow_bodies_time_out_without_blocking_others(no_errors: None) -> None:
    """50 clients each send the headers and part of a body, then trickle or
    stop: each gets 408 after ``api_body_timeout`` while the good publisher
    goes on unhindered."""
    async with api_server(api_body_timeout=1.0, api_publish_rate=0) as srv, serving(srv):
        body = b'{"guild": "g", "t": "E", "d": "' + b"z" * 500 + b'"}'
        t0 = time.monotonic()

        async def slow() -> int:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.api_port)
            try:
                writer.write(post(body)[: -len(body) + 10])
                async with asyncio.timeout(TIMEOUT):
                    head = await reader.readuntil(b"\r\n\r\n")
                return int(head.split(b" ", 2)[1])
            finally:
                writer.close()

        statuses = await asyncio.gather(*(slow() for _ in range(50)))
        assert statuses == [408] * 50
        assert time.monotonic() - t0 >= 1.0


async def test_idle_and_slow_header_connections_are_closed(no_errors: None) -> None:
    async with api_server(api_idle_timeout=1.0, api_publish_rate=0) as srv, serving(srv):
        t0 = time.monotonic()
        conns = [await asyncio.open_connection("127.0.0.1", srv.api_port) for _ in range(60)]
        for _, w in conns[30:]:
            w.write(b"POST /v1/publish HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        async with asyncio.timeout(TIMEOUT):
            rest = await asyncio.gather(*(r.read() for r, _ in conns))
        assert rest == [b""] * 60  # closed without an answer
        assert time.monotonic() - t0 >= 1.0
        for _, w in conns:
            w.close()


def _bad_requests() -> list[tuple[bytes, int]]:
    """(request, expected status): one of each kind, never a 500."""
    ok = orjson.dumps({"guild": "g", "t": "E", "d": 1})
    deep = b'{"guild": "g", "t": "E", "d": ' + nested(300) + b"}"
    return [
        (post(b"{not json"), 400),
        (post(b""), 400),
        (post(b"\xff\xfe"), 400),
        (post(b"[1, 2]"), 400),
        (post(b'{"guild": "g", "t": "E", "d": 1e999}'), 400),
        (post(deep), 400),  # decodes, cannot be re-encoded
        (post(b'{"guild": "../../etc", "t": "E"}'), 400),
        (post(b'{"guild": "g", "t": "READY"}'), 400),
        (post(ok, ctype="text/plain"), 415),
        (post(ok, ctype="application/x-www-form-urlencoded"), 415),
        (post(ok, ctype="multipart/form-data; boundary=x"), 415),
        (post(ok, ctype=None), 415),
        (post(ok, key=None), 401),
        (post(ok, key="wrong-key"), 403),
        (post(ok).replace(b"Bearer", b"Basic"), 401),
        (post(ok).replace(b"POST", b"PUT"), 405),
        (
            b"GET /v1/guilds/..%2F..%2Fetc HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {KEY}\r\n\r\n".encode(),
            400,
        ),
        (
            b"GET /v1/guilds/g/history?after=-1 HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: Bearer {KEY}\r\n\r\n".encode(),
            400,
        ),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"h" * 10_000 + b"\r\n\r\n", 400),
        (b"NONSENSE\r\n\r\n", 400),
    ]


async def test_a_flood_of_bad_requests_is_answered_and_harmless(no_errors: None) -> None:
    async with api_server(api_publish_rate=0) as srv, serving(srv):
        cases = _bad_requests() * 15
        results = await asyncio.gather(*(http_raw(srv.api_port, req) for req, _ in cases))
        got = [status for status, _ in results]
        wrong = [(req[:60], w, g) for (req, w), g in zip(cases, got, strict=True) if g != w]
        assert wrong == [], wrong[:10]
