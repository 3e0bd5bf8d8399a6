"""Durable history (``--data-dir``): a restarted node continues each guild's
``s`` and epoch, a kill -9 in the middle of a publish stream loses no
acknowledged event, and a damaged journal is repaired with a warning and
never yields a wrong event."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aiohttp
from websockets.exceptions import ConnectionClosed

from guildcast.broker.disk import GUILDS_DIR
from guildcast.core import journal
from guildcast.core.journal import event_prefix
from guildcast.core.tokens import make_token
from guildcast.protocol.wire import dispatch_json
from tests.support.api import Api
from tests.support.gateway import recv, subscribe
from tests.support.node import SECRET, api_server, serve_process
from tests.support.wait import TIMEOUT, until

TOKEN = make_token(SECRET, "watcher", ["*"], [], None, 3600)


def append_bytes(path: Path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def journal_file(data: Path, gid: str) -> Path:
    return journal.journal_path(data / GUILDS_DIR, gid)


async def test_embedded_restart_continues_s_epoch_and_recovery(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    async with api_server(data_dir=data) as srv:
        _, epoch = await srv.publish_ex("g", "E", {"n": 1})
        ws, sub = await subscribe(srv.url, TOKEN, "g")
        assert sub == {"epoch": epoch, "s": 1, "recovered": False}
        await srv.publish("g", "E", {"n": 2})
        assert (await recv(ws))["s"] == 2
        await srv.publish("g", "E", {"n": 3})
        assert (await recv(ws))["s"] == 3
        await ws.close()
        for n in (4, 5):
            await srv.publish("g", "E", {"n": n})  # the client misses these
    async with api_server(data_dir=data) as srv:
        ws, sub = await subscribe(srv.url, TOKEN, "g", {"epoch": epoch, "s": 3})
        try:
            assert sub == {"epoch": epoch, "s": 5, "recovered": True}
            replay = [await recv(ws) for _ in range(2)]
            assert [(m["s"], m["d"]) for m in replay] == [(4, {"n": 4}), (5, {"n": 5})]
            assert await srv.publish_ex("g", "E", {"n": 6}) == (6, epoch)
            assert (await recv(ws))["s"] == 6
        finally:
            await ws.close()


async def test_kill_9_mid_stream_loses_no_acknowledged_event(tmp_path: Path) -> None:
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--api-publish-rate", "0"]
    gid = "stream"
    acked: dict[int, int] = {}  # s -> the publisher's counter, for every 200
    seen: list[dict[str, Any]] = []  # what the subscriber got before the kill
    writers = 4
    async with serve_process(args, tmp_path / "run1.log") as node:
        ws, sub = await subscribe(node.url, TOKEN, gid)
        epoch = sub["epoch"]
        stop = asyncio.Event()

        async def read() -> None:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    seen.append(await recv(ws, timeout=TIMEOUT))

        async def publish(k: int) -> None:
            i = k
            async with Api(node.api_url) as api:
                while not stop.is_set():
                    try:
                        status, body, _ = await api.publish({"guild": gid, "t": "N", "d": i})
                    except (aiohttp.ClientError, TimeoutError):
                        return  # the node is gone: this one was not acknowledged
                    assert status == 200, body
                    assert body["epoch"] == epoch
                    acked[body["s"]] = i
                    i += writers

        reader = asyncio.create_task(read())
        pubs = [asyncio.create_task(publish(k)) for k in range(writers)]
        await until(lambda: len(acked) >= 300, "300 acknowledged publishes")
        await node.kill()  # in the middle of the stream: publishes are in flight
        stop.set()
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*pubs)
            await reader
    assert seen, "the subscriber saw nothing before the kill"
    assert [m["s"] for m in seen] == list(range(1, len(seen) + 1))
    last_seen = seen[-1]["s"]

    async with serve_process(args, tmp_path / "run2.log") as node:
        ws, sub = await subscribe(node.url, TOKEN, gid, {"epoch": epoch, "s": last_seen})
        try:
            assert sub["epoch"] == epoch and sub["recovered"] is True
            head = sub["s"]
            assert head >= max(acked)
            replay = [await recv(ws) for _ in range(head - last_seen)]
            assert [m["s"] for m in replay] == list(range(last_seen + 1, head + 1))
            got = {m["s"]: m["d"] for m in [*seen, *replay]}
            # every acknowledged event is there, with its own content
            assert all(got[s] == i for s, i in acked.items())
            # the ones the node wrote but could not acknowledge are real ones too
            assert len(set(got.values())) == len(got)
            assert all(i % writers in range(writers) for i in got.values())
            # and the guild goes on in the same epoch
            async with Api(node.api_url) as api:
                status, body, _ = await api.publish({"guild": gid, "t": "N", "d": -1})
            assert (status, body["s"], body["epoch"]) == (200, head + 1, epoch)
            assert (await recv(ws))["s"] == head + 1
        finally:
            await ws.close()


async def test_damaged_journal_is_repaired_on_start_with_a_warning(tmp_path: Path) -> None:
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--log-format", "json"]
    gid = "torn"
    async with serve_process(args, tmp_path / "run1.log") as node:
        async with Api(node.api_url) as api:
            for n in range(1, 5):
                status, body, _ = await api.publish({"guild": gid, "t": "N", "d": n})
                assert status == 200
        epoch = body["epoch"]
        assert await node.terminate() == 0

    # 1. A torn tail (a crash in the middle of writing event 5): all of its
    # record but 7 bytes reached the file, and its high-water mark was never
    # written (it follows a complete write). Cutting into an event that was
    # completely written is a lost tail instead: tests/hardening/test_lost_tail.py.
    path = journal_file(data, gid)
    payload = dispatch_json(gid, "N", 5, b"5")
    append_bytes(path, (event_prefix(5, "N", time.time(), payload) + payload)[:-7])
    async with serve_process(args, tmp_path / "run2.log") as node:
        async with Api(node.api_url) as api:
            status, page, _ = await api.get(f"/v1/guilds/{gid}/history")
        assert status == 200
        assert page["epoch"] == epoch and page["s"] == 4
        assert [(e["s"], e["d"]) for e in page["events"]] == [(n, n) for n in range(1, 5)]
        assert await node.terminate() == 0
        warnings = [r for r in node.log_json() if r["logger"] == "guildcast.journal"]
    assert len(warnings) == 1, warnings
    assert warnings[0]["level"] == "WARNING" and warnings[0]["guild"] == gid
    assert "torn tail" in warnings[0]["msg"] and warnings[0]["new_epoch"] is False

    # 2. A flipped byte inside event 4: corruption, so history is lost.
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10
    path.write_bytes(bytes(raw))
    async with serve_process(args, tmp_path / "run3.log") as node:
        async with Api(node.api_url) as api:
            status, page, _ = await api.get(f"/v1/guilds/{gid}/history")
        assert status == 200
        assert page["epoch"] != epoch and page["s"] == 3
        assert [(e["s"], e["d"]) for e in page["events"]] == [(n, n) for n in range(1, 4)]
        # a client of the old epoch is told to reload, never replayed anything
        ws, sub = await subscribe(node.url, TOKEN, gid, {"epoch": epoch, "s": 2})
        await ws.close()
        assert sub == {"epoch": page["epoch"], "s": 3, "recovered": False}
        assert await node.terminate() == 0
        warnings = [r for r in node.log_json() if r["logger"] == "guildcast.journal"]
    assert len(warnings) == 1 and warnings[0]["level"] == "WARNING"
    assert "corrupt record" in warnings[0]["msg"] and warnings[0]["new_epoch"] is True


async def test_fsync_always_acknowledges_after_the_fsync(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    async with api_server(data_dir=data, fsync="always") as srv, Api(srv.api_url) as api:
        broker = srv.broker
        before = broker.fsyncs  # type: ignore[attr-defined]
        status, _, _ = await api.publish(
            {"events": [{"guild": "f", "t": "E", "d": i} for i in range(3)]}
        )
        assert status == 200
        status, _, _ = await api.publish({"guild": "f", "t": "E"})
        assert status == 200
        # the file's creation, then one fsync for the second publish; all durable
        assert broker.fsyncs >= before + 2  # type: ignore[attr-defined]
        assert journal.load(journal_file(tmp_path / "data", "f"), "f").head == 4
