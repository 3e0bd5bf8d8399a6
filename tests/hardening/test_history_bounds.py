"""History bounded by bytes, per guild and per node (issue "Hardening 3",
item 4): publishing many times the bound keeps the node's history bytes
under it, the evictions are counted on /metrics, and a subscriber whose
recovery falls in evicted history is told ``recovered: false``, never given
other events. Memory and ``--data-dir`` nodes alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from guildcast.core.tokens import make_token
from tests.support.api import Api
from tests.support.gateway import recv as recv_json
from tests.support.gateway import subscribe
from tests.support.node import SECRET, api_server

TOKEN = make_token(SECRET, "watcher", ["*"], [], None, 3600)
#: The node bound for the test: 64 events of about 2 KiB.
NODE_BYTES = 64 * 2300
BIG = "y" * 2000


def metric(text: bytes, name: str) -> float:
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize("durable", [False, True])
async def test_evicted_history_is_never_replayed(tmp_path: Path, durable: bool) -> None:
    extra = {"data_dir": str(tmp_path / "data")} if durable else {}
    async with api_server(
        history_node_bytes=NODE_BYTES, api_publish_rate=0, metrics_open=True, **extra
    ) as srv:
        epoch = ""
        for n in range(1, 11):
            s, epoch = await srv.publish_ex("quiet", "N", {"n": n, "pad": BIG})
            assert s == n
        # The client saw events up to s=3 and went away.
        # Another guild publishes ten times the node's bound.
        for n in range(640):
            await srv.publish("loud", "N", {"n": n, "pad": BIG})
        async with Api(srv.api_url) as api:
            _, text, _ = await api.get("/metrics")
        assert metric(text, "guildcast_history_bytes") <= NODE_BYTES
        assert metric(text, "guildcast_history_evictions_total") >= 640 + 10 - 64
        ws, sub = await subscribe(srv.url, TOKEN, "quiet", {"epoch": epoch, "s": 3})
        try:
            # quiet's events are the oldest of the node: gone, so no replay
            assert sub == {"epoch": epoch, "s": 10, "recovered": False}
            s2, _ = await srv.publish_ex("quiet", "N", {"n": 11})
            nxt = await recv_json(ws)
            assert (nxt["s"], nxt["d"]) == (s2, {"n": 11})  # live, not a replay
        finally:
            await ws.close()
        # Recent history of the loud guild is still served in full.
        ws, sub = await subscribe(srv.url, TOKEN, "loud", {"epoch": sub["epoch"], "s": 1})
        await ws.close()
        assert sub["recovered"] is False  # another guild's epoch: never recovered
        async with Api(srv.api_url) as api:
            status, page, _ = await api.get("/v1/guilds/loud/history")
        assert status == 200
        got = [e["s"] for e in page["events"]]
        assert got == list(range(got[0], 641)) and len(got) >= 50
