"""A journal that lost its tail must not keep its epoch (issue "Hardening 3",
item 1): a real ``guildcast serve --data-dir`` process is killed, one guild's
journal is cut at a record boundary (what restoring an older copy of the
file, or a volume that dropped its last writes, leaves), and the restarted
node must never give an ``(epoch, s)`` a client already holds to a different
event. The high-water mark (server/core/marks.py) is what tells."""

from __future__ import annotations

import os
from pathlib import Path

from guildcast.broker.disk import GUILDS_DIR, RESTORED_FILE
from guildcast.core import journal
from guildcast.core.tokens import make_token
from tests.support.api import Api
from tests.support.gateway import recv as recv_json
from tests.support.gateway import subscribe
from tests.support.node import SECRET, serve_process

TOKEN = make_token(SECRET, "watcher", ["*"], [], None, 3600)


def record_ends(path: Path) -> list[int]:
    """The offset after each record of a journal (header first)."""
    data = path.read_bytes()
    ends, off = [], 0
    while off < len(data):
        length = int.from_bytes(data[off : off + 4], "big")
        off += journal.RECORD_OVERHEAD + length
        ends.append(off)
    assert off == len(data)
    return ends


async def publish(api_url: str, gid: str, values: range) -> tuple[str, list[int]]:
    """Publish ``d = value`` for each value, one acknowledged request each."""
    epochs, seqs = set(), []
    async with Api(api_url) as api:
        for v in values:
            status, body, _ = await api.publish({"guild": gid, "t": "N", "d": v})
            assert status == 200, body
            epochs.add(body["epoch"])
            seqs.append(body["s"])
    assert len(epochs) == 1
    return epochs.pop(), seqs


async def test_a_journal_cut_at_a_record_boundary_starts_a_new_epoch(tmp_path: Path) -> None:
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--log-format", "json", "--api-publish-rate", "0"]
    gid = "cut"
    async with serve_process(args, tmp_path / "run1.log") as node:
        epoch, seqs = await publish(node.api_url, gid, range(1, 201))
        assert seqs == list(range(1, 201))
        await node.kill()  # SIGKILL: the page cache keeps what was written

    path = journal.journal_path(data / GUILDS_DIR, gid)
    ends = record_ends(path)
    assert len(ends) == 201  # the header and 200 events
    os.truncate(path, ends[120])  # the header and events 1..120: a clean cut

    async with serve_process(args, tmp_path / "run2.log") as node:
        new_epoch, seqs = await publish(node.api_url, gid, range(1001, 1061))
        assert new_epoch != epoch
        assert seqs == list(range(121, 181))  # s goes on, under the new epoch
        # The client saw events up to s=150 of the old epoch: it must reload,
        # never be replayed events 151.. that are not the ones it missed.
        ws, sub = await subscribe(node.url, TOKEN, gid, {"epoch": epoch, "s": 150})
        try:
            assert sub == {"epoch": new_epoch, "s": 180, "recovered": False}
            # A client of the new epoch recovers the new events as they were sent.
            ws2, sub2 = await subscribe(node.url, TOKEN, gid, {"epoch": new_epoch, "s": 170})
            assert sub2 == {"epoch": new_epoch, "s": 180, "recovered": True}
            replay = [await recv_json(ws2) for _ in range(10)]
            assert [(m["s"], m["d"]) for m in replay] == [(171 + i, 1051 + i) for i in range(10)]
            await ws2.close()
        finally:
            await ws.close()
        assert await node.terminate() == 0
        cut_lines = [r for r in node.log_json() if r["logger"] == "guildcast.journal"]
    # The cut is logged, once, as what it is.
    assert len(cut_lines) == 1, cut_lines
    line = cut_lines[0]
    assert line["level"] == "WARNING" and line["guild"] == gid and line["new_epoch"] is True
    assert "s=120" in line["msg"] and "high-water mark is s=200" in line["msg"]


async def test_a_kill_9_without_a_cut_keeps_the_epoch(tmp_path: Path) -> None:
    """The mark does not cost the kill -9 guarantee: same epoch, full recovery."""
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--api-publish-rate", "0"]
    async with serve_process(args, tmp_path / "run1.log") as node:
        epoch, _ = await publish(node.api_url, "k", range(1, 31))
        await node.kill()
    async with serve_process(args, tmp_path / "run2.log") as node:
        ws, sub = await subscribe(node.url, TOKEN, "k", {"epoch": epoch, "s": 25})
        try:
            assert sub == {"epoch": epoch, "s": 30, "recovered": True}
            assert [(await recv_json(ws))["d"] for _ in range(5)] == [26, 27, 28, 29, 30]
        finally:
            await ws.close()


async def test_a_restored_data_dir_gives_every_guild_a_new_epoch(tmp_path: Path) -> None:
    """The procedure of docs/OPERATIONS.md, "Backups and restore": a whole
    data dir put back from a copy carries marks as old as its journals, so
    the operator says so with the RESTORED file."""
    data = tmp_path / "data"
    args = ["--data-dir", str(data), "--api-publish-rate", "0"]
    async with serve_process(args, tmp_path / "run1.log") as node:
        epoch_a, _ = await publish(node.api_url, "a", range(1, 11))
        epoch_b, _ = await publish(node.api_url, "b", range(1, 4))
        assert await node.terminate() == 0
    (data / RESTORED_FILE).touch()
    async with serve_process(args, tmp_path / "run2.log") as node:
        ws, sub = await subscribe(node.url, TOKEN, "a", {"epoch": epoch_a, "s": 5})
        await ws.close()
        assert sub["epoch"] != epoch_a and sub["s"] == 10 and sub["recovered"] is False
        new_b, seqs = await publish(node.api_url, "b", range(4, 6))
        assert new_b != epoch_b and seqs == [4, 5]
        assert not (data / RESTORED_FILE).exists()  # once: the next start keeps epochs
        assert await node.terminate() == 0
    async with serve_process(args, tmp_path / "run3.log") as node:
        again, _ = await publish(node.api_url, "b", range(6, 7))
        assert again == new_b
