"""The Redis broker's lean RESP connection (``guildcast.broker.resp``) and the
feed's delivery of what one read brought, against a real redis-server.

- Commands are packed byte for byte as redis-py packs them.
- A batch's replies come back in order, an error reply among them without
  harming the connection; a lost connection fails what is still owed.
- The URL's credentials and database are used (AUTH, ACL user, SELECT) by
  the broker's own connections as by redis-py's: a broker over a Redis with
  a password, in database 3, sequences, delivers and reads back.
- ``unix://`` and ``rediss://`` (TLS) URLs work the same way; a server
  certificate the URL's CA did not sign is refused.
- One read's records reach each guild as one list, in order, and a presence
  change between two records of a guild stays between them.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import trustme
from redis.asyncio.connection import Connection

from guildcast.broker import resp
from guildcast.broker.base import Presence, Record
from guildcast.broker.redis import (
    MAX_PACKED_HEADS,
    RedisBroker,
    channel,
    guild_keys,
    trim_key,
)
from tests.support.redis import RedisProc, free_port
from tests.support.wait import until


@pytest.mark.parametrize(
    "args",
    [
        ("PING",),
        ("SET", "k", "v"),
        ("EVALSHA", "ab" * 20, 4, "gc:{g}:epoch", b"\x00\xff|bytes", 0, -17, 2**63),
        ("PUBLISH", "gc:{é✓}:ch", "unicode é ✓", b""),
    ],
)
def test_pack_is_redis_pys_encoding(args: tuple[resp.Arg, ...]) -> None:
    assert resp.pack(*args) == b"".join(Connection().pack_command(*args))


def test_a_packed_head_and_the_rest_make_the_same_command() -> None:
    head = resp.bulks(["EVALSHA", "ab" * 20, 2, "k1", "k2"])
    rest: list[resp.Arg] = ["x", 7, b"\x00"]
    assert resp.pack_after(head, 5, rest) == resp.pack(
        "EVALSHA", "ab" * 20, 2, "k1", "k2", "x", 7, b"\x00"
    )


async def test_the_packed_heads_are_bounded(redis_proc: RedisProc) -> None:
    b = RedisBroker(redis_proc.url, 50, 300)
    for i in range(MAX_PACKED_HEADS + 10):
        b._head(f"g{i}", i % 2 == 0)
    assert 0 < len(b._heads) <= MAX_PACKED_HEADS
    # A guild's head names its keys: the script's KEYS, keyed or not.
    plain, keyed = b._head("g", False), b._head("g", True)
    assert plain[0] == resp.bulks(
        ["EVALSHA", b._append_script.sha, 5, *guild_keys("g"), trim_key("g")]
    )
    assert keyed[1] == 3 + 7
    await b.close()


def test_pack_refuses_what_redis_py_would_not_send() -> None:
    with pytest.raises(TypeError):
        resp.pack("SET", "k", 1.5)  # type: ignore[arg-type]


async def test_replies_come_in_order_with_errors_among_them(redis_proc: RedisProc) -> None:
    pool = aioredis.ConnectionPool.from_url(redis_proc.url)
    link = await resp.connect(pool)
    try:
        data = resp.pack_all(
            [("SET", "k", "v"), ("INCR", "k"), ("GET", "k"), ("NOSUCHCOMMAND",), ("PING",)]
        )
        got = await link.request(data, 5)
        assert got[0] == b"OK"
        assert isinstance(got[1], resp.ReplyError) and "not an integer" in str(got[1])
        assert got[2] == b"v"
        assert isinstance(got[3], resp.ReplyError)
        assert got[4] == b"PONG"
        # Two batches in flight: each gets its own replies.
        f1 = link.request(resp.pack_all([("INCR", "n"), ("INCR", "n")]), 2)
        f2 = link.request(resp.pack("INCR", "n"), 1)
        assert await f1 == [1, 2]
        assert await f2 == [3]
        assert link.is_open
    finally:
        link.close()
        await pool.aclose()


async def test_a_lost_connection_fails_what_is_owed(redis_proc: RedisProc) -> None:
    pool = aioredis.ConnectionPool.from_url(redis_proc.url)
    link = await resp.connect(pool)
    admin = aioredis.Redis(port=redis_proc.port)
    try:
        # BLPOP holds the reply back; the kill comes while it is owed.
        owed = link.request(resp.pack("BLPOP", "nothing", 0), 1)
        await until(
            lambda: _blocked(admin),
            "the BLPOP to block",
        )
        await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(owed, 10)
        await asyncio.wait_for(link.closed, 10)
        assert not link.is_open
        with pytest.raises(ConnectionError):
            link.request(resp.pack("PING"), 1)
    finally:
        link.close()
        await admin.aclose()
        await pool.aclose()


async def _blocked(admin: aioredis.Redis) -> bool:
    info: Any = await admin.info("clients")
    return int(info["blocked_clients"]) >= 1


async def test_credentials_and_database_of_the_url(redis_proc: RedisProc) -> None:
    admin = aioredis.Redis(port=redis_proc.port)
    await admin.execute_command("ACL", "SETUSER", "app", "on", ">s3cret", "~*", "&*", "+@all")
    await admin.config_set("requirepass", "pw")
    await admin.aclose()
    admin = aioredis.Redis(port=redis_proc.port, password="pw")
    base = f"127.0.0.1:{redis_proc.port}"
    try:
        for url in (f"redis://:pw@{base}/3", f"redis://app:s3cret@{base}/3"):
            pool = aioredis.ConnectionPool.from_url(url)
            link = await resp.connect(pool)
            try:
                assert await link.request(resp.pack("SET", "where", url), 1) == [b"OK"]
            finally:
                link.close()
                await pool.aclose()
            await admin.select(3)  # type: ignore[no-untyped-call]
            assert await admin.get("where") == url.encode()
        pool = aioredis.ConnectionPool.from_url(f"redis://:wrong@{base}/3")
        with pytest.raises(resp.ReplyError):
            await resp.connect(pool)
        await pool.aclose()

        # The whole broker over that Redis: appends, feed, reads.
        b = RedisBroker(f"redis://app:s3cret@{base}/3", 50, 300)
        seen: list[Record] = []
        b.set_feed(lambda gid, recs: seen.extend(recs) if isinstance(recs, list) else None)
        await b.start()
        try:
            await b.listen("g")
            epoch, ss = await b.append("g", [("E", b"1"), ("E", b"2")])
            assert ss == [1, 2]
            await until(lambda: _at_least(seen, 2), "the feed to deliver both")
            assert [r.s for r in seen] == [1, 2] and {r.epoch for r in seen} == {epoch}
            assert [r.s for r in (await b.read("g", 0, 10))[1]] == [1, 2]
            assert await admin.exists("gc:{g}:seq")  # database 3, where admin looks
        finally:
            await b.close()
    finally:
        await admin.aclose()


async def _at_least(seen: list[Record], n: int) -> bool:
    return len(seen) >= n


def _message(gid: str, data: bytes) -> list[bytes]:
    return [b"message", channel(gid).encode(), data]


def _record(s: int, epoch: str = "e1") -> bytes:
    return b"%d|E|1000|%s|{}" % (s, epoch.encode())


async def test_one_read_reaches_each_guild_as_one_list_in_order(redis_proc: RedisProc) -> None:
    b = RedisBroker(redis_proc.url, 50, 300)
    calls: list[tuple[str, Any]] = []
    b.set_feed(
        lambda gid, recs: calls.append(
            (gid, [r.s for r in recs] if isinstance(recs, list) else recs)
        ),
        lambda gid, kind, m, v: calls.append((gid, (kind, m.user, v))),
    )
    await b.start()
    try:
        for gid in ("a", "b"):
            await b.listen(gid)
        member = orjson.dumps({**Presence("u1", "s1", "n1").as_dict(), "v": 7})
        calls.clear()
        b._on_replies(
            [
                _message("a", _record(1)),
                _message("b", _record(1)),
                _message("a", _record(2)),
                _message("a", b"P|join|" + member),
                _message("a", _record(3)),
                _message("b", _record(2)),
                _message("elsewhere", _record(9)),  # a channel nobody listens to
                [b"pong", b""],
            ]
        )
        # Per guild, in order: a's records before the join arrive before it,
        # those after it after; b's two as one list. (Guilds are independent:
        # their order against each other is not kept.)
        assert [c for c in calls if c[0] == "a"] == [
            ("a", [1, 2]),
            ("a", ("join", "u1", 7)),
            ("a", [3]),
        ]
        assert [c for c in calls if c[0] == "b"] == [("b", [1, 2])]
        assert len(calls) == 4
    finally:
        await b.close()


async def test_a_broker_over_a_unix_socket(tmp_path: Path) -> None:
    """``unix://`` URLs: the lean connections dial the socket as redis-py does."""
    sock = tmp_path / "redis.sock"
    exe = shutil.which("redis-server")
    if exe is None:  # as tests/support/redis.py: a failure in CI
        if os.environ.get("CI"):
            raise RuntimeError("redis-server is not installed (.ci/run should install it)")
        pytest.skip("redis-server is not installed")
    args = [exe, "--port", "0", "--unixsocket", str(sock), "--dir", str(tmp_path)]
    proc = await asyncio.create_subprocess_exec(
        *args, "--save", "", "--appendonly", "no", stdout=asyncio.subprocess.DEVNULL
    )
    try:

        async def listening() -> bool:
            return sock.exists()

        await until(listening, "redis-server's socket")
        b = RedisBroker(f"unix://{sock}?db=2", 50, 300)
        seen: list[Record] = []
        b.set_feed(lambda gid, recs: seen.extend(recs) if isinstance(recs, list) else None)
        await b.start()
        try:
            await b.listen("g")
            _, ss = await b.append("g", [("E", b"1")])
            assert ss == [1]
            await until(lambda: _at_least(seen, 1), "the feed to deliver it")
            assert [r.s for r in (await b.read("g", 0, 10))[1]] == [1]
        finally:
            await b.close()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


async def test_a_broker_over_tls(tmp_path: Path) -> None:
    """``rediss://`` URLs: the lean connections use redis-py's TLS context for
    the URL's settings, so they trust the server redis-py trusts, and refuse
    one it would refuse."""
    exe = shutil.which("redis-server")
    if exe is None:  # as tests/support/redis.py: a failure in CI
        if os.environ.get("CI"):
            raise RuntimeError("redis-server is not installed (.ci/run should install it)")
        pytest.skip("redis-server is not installed")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca_pem, cert_pem, key_pem = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    port = free_port()
    args = [exe, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"]
    args += ["--tls-cert-file", str(cert_pem), "--tls-key-file", str(key_pem)]
    args += ["--tls-ca-cert-file", str(ca_pem), "--tls-auth-clients", "no"]
    proc = await asyncio.create_subprocess_exec(
        *args,
        "--dir",
        str(tmp_path),
        "--save",
        "",
        "--appendonly",
        "no",
        stdout=asyncio.subprocess.DEVNULL,
    )
    try:

        async def listening() -> bool:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return False
            w.close()
            return True

        await until(listening, "redis-server's TLS port")
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca_pem}"
        b = RedisBroker(url, 50, 300)
        seen: list[Record] = []
        b.set_feed(lambda gid, recs: seen.extend(recs) if isinstance(recs, list) else None)
        await b.start()
        try:
            await b.listen("g")
            _, ss = await b.append("g", [("E", b"1"), ("E", b"2")])
            assert ss == [1, 2]
            await until(lambda: _at_least(seen, 2), "the feed to deliver both")
            assert [r.s for r in (await b.read("g", 0, 10))[1]] == [1, 2]
        finally:
            await b.close()

        # A CA the server's certificate is not from: the connection is refused
        # by the same verification redis-py applies.
        other = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(other))
        pool = aioredis.ConnectionPool.from_url(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={other}")
        try:
            with pytest.raises(ssl.SSLError):
                await resp.connect(pool)
        finally:
            await pool.aclose()
    finally:
        proc.terminate()
        await proc.wait()


async def test_a_reply_that_is_not_resp_fails_the_link_as_a_lost_connection() -> None:
    """Something that is not Redis answers (a URL aimed at the wrong port, a
    corrupted stream): the waiting batch fails with a ConnectionError, as for
    a lost link (the broker answers "outcome unknown"), never with hiredis's
    own ProtocolError, which no caller expects."""

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"!garbage\r\n")
        await writer.drain()
        await reader.read(100)  # until the client closes
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        pool = aioredis.ConnectionPool.from_url(f"redis://127.0.0.1:{port}/0")
        link = await resp.connect(pool)
        try:
            with pytest.raises(ConnectionError):
                await asyncio.wait_for(link.request(resp.pack("PING"), 1), 10)
            assert not link.is_open
        finally:
            link.close()
            await pool.aclose()
    finally:
        server.close()
        await server.wait_closed()
