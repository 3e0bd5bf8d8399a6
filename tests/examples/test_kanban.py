"""examples/kanban end to end: card actors owning their files, a board actor
publishing every accepted change through the embedded Guildcast, over real
HTTP and a real gateway connection on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import psutil
import pytest
import websockets
from aiohttp import web

from guildcast.examples.kanban import Kanban, Settings, make_app
from tests.support.redis import free_port
from tests.support.wait import until

TIMEOUT = 60.0


@dataclass
class Running:
    kb: Kanban
    base: str
    http: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
        async with self.http.request(method, self.base + path, json=body) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, {"text": text}


@asynccontextmanager
async def kanban(data: Path, **kw: Any) -> AsyncIterator[Running]:
    async with Kanban(Settings(data=data, gateway_port=0, **kw)) as kb:
        runner = web.AppRunner(make_app(kb), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession() as http:
                yield Running(kb, f"http://127.0.0.1:{port}", http)
        finally:
            await runner.cleanup()


class Follower:
    """A plain websockets client following one board's guild from a listing."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.subscribed: dict[str, Any] = {}
        self._task: asyncio.Task[None] | None = None
        self._ws: Any = None

    async def start(self, listing: dict[str, Any]) -> None:
        ws = self._ws = await websockets.connect(listing["gateway"], proxy=None)
        assert orjson.loads(await ws.recv())["op"] == 10
        guilds = {listing["guild"]: listing["position"]}
        ident = {"op": 2, "d": {"token": listing["token"], "guilds": guilds}}
        await ws.send(orjson.dumps(ident).decode())
        assert orjson.loads(await ws.recv())["t"] == "READY"
        sub = orjson.loads(await ws.recv())
        assert sub["t"] == "SUBSCRIBED", sub
        self.subscribed = sub["d"]
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self._ws:
            msg = orjson.loads(raw)
            if msg["op"] == 0 and msg["t"].startswith("CARD_"):
                self.events.append(msg)

    async def close(self) -> None:
        await self._ws.close()
        if self._task is not None:
            await self._task


async def test_the_api_answers_each_case(tmp_path: Path) -> None:
    async with kanban(tmp_path) as k:
        st, body = await k.call("POST", "/api/boards/b1/cards", {"title": "write docs"})
        assert st == 201 and body["card"]["version"] == 1 and body["card"]["column"] == "todo"
        cid = body["card"]["id"]
        st, body = await k.call("POST", f"/api/cards/{cid}/move", {"column": "doing", "version": 1})
        assert st == 200 and body["card"]["version"] == 2
        # A stale version is refused with the current state, never applied.
        st, body = await k.call("POST", f"/api/cards/{cid}/move", {"column": "done", "version": 1})
        assert st == 409 and body["card"]["column"] == "doing" and body["card"]["version"] == 2
        st, body = await k.call("POST", f"/api/cards/{cid}/move", {"column": "nope", "version": 2})
        assert st == 422 and "no column" in body["error"]
        st, body = await k.call("POST", f"/api/cards/{cid}/edit", {"title": "docs!", "version": 2})
        assert st == 200 and body["card"]["title"] == "docs!" and body["card"]["version"] == 3
        # The WIP limit of "doing" (3 by default) is checked by the board.
        for i in range(2):
            st, body = await k.call("POST", "/api/boards/b1/cards", {"title": f"t{i}"})
            c = body["card"]
            st, _ = await k.call(
                "POST", f"/api/cards/{c['id']}/move", {"column": "doing", "version": 1}
            )
            assert st == 200
        st, body = await k.call("POST", "/api/boards/b1/cards", {"title": "one too many"})
        extra = body["card"]
        st, body = await k.call(
            "POST", f"/api/cards/{extra['id']}/move", {"column": "doing", "version": 1}
        )
        assert st == 422 and "WIP limit" in body["error"]
        st, body = await k.call("POST", f"/api/cards/{cid}/archive", {"version": 3})
        assert st == 200 and body["card"]["archived"] is True
        st, body = await k.call("POST", f"/api/cards/{cid}/move", {"column": "todo", "version": 4})
        assert st == 422 and "archived" in body["error"]
        # ... and the freed WIP slot takes the card that was refused.
        st, _ = await k.call(
            "POST", f"/api/cards/{extra['id']}/move", {"column": "doing", "version": 1}
        )
        assert st == 200
        st, listing = await k.call("GET", "/api/boards/b1")
        assert st == 200 and [c["title"] for c in listing["cards"]] == ["t0", "t1", "one too many"]
        assert listing["position"]["s"] == 10  # every accepted change, one event each
        assert (await k.call("GET", "/api/cards/0000"))[0] == 404
        assert (await k.call("POST", f"/api/cards/{extra['id']}/move", {"column": "x"}))[0] == 400
        async with k.http.post(k.base + f"/api/cards/{cid}/edit", data=b"{not json") as r:
            assert r.status == 400
        assert (await k.call("GET", "/api/boards/Bad_Id"))[0] == 400
        st, body = await k.call("PUT", "/api/boards/b1", {"columns": ["todo", "done"]})
        assert st == 422 and "doing" in body["error"]  # cards still there


async def test_200_concurrent_moves_of_one_card_from_20_clients(tmp_path: Path) -> None:
    """Each move answered exactly once; accepted versions unique and without
    holes; a live subscriber sees every accepted change once, in order; the
    file ends equal to the last accepted state."""
    async with kanban(tmp_path) as k:
        st, body = await k.call("POST", "/api/boards/race/cards", {"title": "contested"})
        assert st == 201
        card = body["card"]
        st, listing = await k.call("GET", "/api/boards/race")
        assert st == 200 and listing["position"]["s"] == 1
        follower = Follower()
        await follower.start(listing)
        answers: list[tuple[int, dict[str, Any]]] = []

        async def client(seed: int) -> None:
            rng = random.Random(seed)
            known = dict(card)
            async with aiohttp.ClientSession() as http:
                for _ in range(10):
                    target = "done" if known["column"] == "todo" else "todo"
                    if rng.random() < 0.2:
                        target = "doing"
                    url = f"{k.base}/api/cards/{card['id']}/move"
                    async with http.post(
                        url, json={"column": target, "version": known["version"]}
                    ) as r:
                        body = await r.json()
                        answers.append((r.status, body))
                        known = body["card"]

        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(client(i) for i in range(20)))
        assert len(answers) == 200
        assert {st for st, _ in answers} <= {200, 409}
        accepted = [b["card"] for st, b in answers if st == 200]
        versions = sorted(c["version"] for c in accepted)
        assert versions == list(range(2, 2 + len(accepted))), versions
        assert accepted  # the first move to arrive, at least, had the current version
        last = max(accepted, key=lambda c: c["version"])
        await until(lambda: len(follower.events) >= len(accepted), "every accepted change")
        seen = [e["d"] for e in follower.events]
        assert [e["d"]["version"] for e in follower.events] == versions
        assert [e["s"] for e in follower.events] == list(
            range(follower.subscribed["s"] + 1, follower.subscribed["s"] + 1 + len(accepted))
        )
        by_version = {c["version"]: c for c in accepted}
        assert all(by_version[d["version"]] == d for d in seen)
        await follower.close()
        path = tmp_path / "cards" / f"{card['id']}.json"
        await until(lambda: json.loads(path.read_text())["version"] == last["version"], "flush")
    assert json.loads(path.read_text()) == last


async def test_an_idle_card_stops_and_starts_again_from_its_file(tmp_path: Path) -> None:
    async with kanban(tmp_path, card_idle=0.2) as k:
        st, body = await k.call("POST", "/api/boards/b/cards", {"title": "sleepy"})
        cid = body["card"]["id"]
        st, body = await k.call("POST", f"/api/cards/{cid}/move", {"column": "done", "version": 1})
        assert st == 200
        assert k.kb.cards is not None
        first = k.kb.cards.lookup(cid)
        assert first is not None
        await until(lambda: k.kb.cards is not None and k.kb.cards.lookup(cid) is None, "idle stop")
        assert json.loads((tmp_path / "cards" / f"{cid}.json").read_text())["version"] == 2
        started = k.kb.cards.started
        st, body = await k.call("GET", f"/api/cards/{cid}")
        assert st == 200 and body["card"]["column"] == "done" and body["card"]["version"] == 2
        assert body["flushed_version"] == 2
        assert k.kb.cards.started == started + 1 and k.kb.cards.lookup(cid) is not first


class Service:
    """The service as a real process: ``python -m guildcast.examples.kanban``."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.port = free_port()
        self.gateway_port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",
            "-m",
            "guildcast.examples.kanban",
            "--data",
            str(self.data),
            "--port",
            str(self.port),
            "--gateway-port",
            str(self.gateway_port),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        async with asyncio.timeout(TIMEOUT):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                assert line, "the service exited early"
                if re.match(r"kanban: guildcast gateway on ", line):
                    return

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def test_sigkill_keeps_every_acknowledged_and_flushed_write(tmp_path: Path) -> None:
    """What an acknowledgement promises with write-behind (examples/kanban/card.py):
    once a card's ``flushed_version`` has reached a version, that state is on
    disk and survives SIGKILL."""
    svc = Service(tmp_path / "data")
    try:
        await svc.start()
        base = f"http://127.0.0.1:{svc.port}"
        async with aiohttp.ClientSession() as http:
            ids = []
            for i in range(5):
                async with http.post(f"{base}/api/boards/k/cards", json={"title": f"c{i}"}) as r:
                    assert r.status == 201
                    ids.append((await r.json())["card"]["id"])
            states: dict[str, dict[str, Any]] = {}
            for n in range(40):
                cid = ids[n % 5]
                cur = states.get(cid, {"version": 1, "column": "todo"})
                target = "done" if cur["column"] == "todo" else "todo"
                body = {"column": target, "version": cur["version"]}
                async with http.post(f"{base}/api/cards/{cid}/move", json=body) as r:
                    assert r.status == 200
                    states[cid] = (await r.json())["card"]
            for cid, state in states.items():  # wait for the flush each promises

                async def flushed(cid: str = cid, version: int = state["version"]) -> bool:
                    async with http.get(f"{base}/api/cards/{cid}") as r:
                        return bool((await r.json())["flushed_version"] == version)

                await until(flushed, f"card {cid} flushed", timeout=TIMEOUT)
        await svc.kill()
        await svc.start()
        async with aiohttp.ClientSession() as http:
            for cid, state in states.items():
                async with http.get(f"{base}/api/cards/{cid}") as r:
                    assert (await r.json())["card"] == state
            async with http.get(f"{base}/api/boards/k") as r:
                listing = await r.json()
            assert {c["id"]: c for c in listing["cards"]} == states
    finally:
        await svc.close()


async def test_ten_thousand_cards_touched_once(tmp_path: Path) -> None:
    """Actors alive are bounded by the registry limit while they are busy and
    go back to none after the idle timeout; memory is measured (printed)."""
    proc = psutil.Process(os.getpid())
    async with kanban(tmp_path, card_idle=1.0, max_cards=10_000) as k:
        kb = k.kb
        assert kb.cards is not None
        rss0 = proc.memory_info().rss
        peak = 0
        sem = asyncio.Semaphore(200)

        async def touch(i: int) -> None:
            nonlocal peak
            async with sem:
                out = await kb.create("many", f"card {i}", None)
                assert out.status == "ok", out
                peak = max(peak, len(kb.cards or ()))

        async with asyncio.timeout(240):
            await asyncio.gather(*(touch(i) for i in range(10_000)))
        rss1 = proc.memory_info().rss
        assert peak <= 10_000
        # Bounded, and by far: about 10 KiB per live card actor here.
        assert rss1 - rss0 < 256 * 2**20
        await until(lambda: len(kb.cards or ()) == 0, "every card idle-stopped", timeout=120)
        rss2 = proc.memory_info().rss
        print(
            f"\n10,000 cards: peak {peak} card actors alive; RSS +{(rss1 - rss0) / 2**20:.1f} MiB"
            f" while alive ({(rss1 - rss0) / max(peak, 1) / 1024:.2f} KiB per actor, board"
            f" projection included), +{(rss2 - rss0) / 2**20:.1f} MiB after all idled out"
        )
        assert len(list((tmp_path / "cards").glob("*.json"))) == 10_000


async def test_a_full_card_registry_answers_503(tmp_path: Path) -> None:
    async with kanban(tmp_path, max_cards=3) as k:
        for i in range(3):
            assert (await k.call("POST", "/api/boards/f/cards", {"title": f"{i}"}))[0] == 201
        async with k.http.post(k.base + "/api/boards/f/cards", json={"title": "x"}) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "1"


@pytest.mark.parametrize("bad", [{"title": ""}, {"title": "x" * 201}, {"title": 5}, []])
async def test_bad_create_requests_are_400(tmp_path: Path, bad: Any) -> None:
    async with kanban(tmp_path) as k:
        assert (await k.call("POST", "/api/boards/b/cards", bad))[0] == 400
