"""A full disk under ``--data-dir`` (issue "Hardening 2", item 5, and
"Hardening 3", item 8): the data dir is a 2 MiB tmpfs mounted for the test.
Publishes are refused with 503 and nothing unwritten is acknowledged;
``/readyz`` says the node cannot persist until a write works again; no
temporary file is left behind (a failed rewrite removes its own, a start
removes any a crash left); the write failures log a few rate-limited lines,
not one per publish."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from guildcast.broker.disk import GUILDS_DIR
from tests.support.api import Api
from tests.support.node import serve_process

#: Publishes the full-disk phase makes at most (it stops after REFUSALS 503s).
MAX_PUBLISHES = 3000
REFUSALS = 200
PAYLOAD = "x" * 4000


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    path.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def temp_files(data: Path) -> list[str]:
    return [p.name for d in (data, data / GUILDS_DIR) for p in d.iterdir() if ".tmp" in p.name]


async def test_a_full_disk_refuses_publishes_fails_readiness_and_leaves_no_temp_files(
    tmp_path: Path,
) -> None:
    with tmpfs(tmp_path / "data") as data:
        args = ["--data-dir", str(data), "--log-format", "json", "--api-publish-rate", "0"]
        async with serve_process(args, tmp_path / "run1.log") as node:
            async with Api(node.api_url) as api:
                assert (await api.get("/readyz"))[0] == 200
                acked: dict[str, int] = {}
                refused = 0
                for i in range(MAX_PUBLISHES):
                    gid = f"g{i}"
                    status, body, _ = await api.publish({"guild": gid, "t": "N", "d": PAYLOAD})
                    if status == 200:
                        acked[gid] = body["s"]
                    else:
                        assert status == 503, body
                        refused += 1
                        if refused >= REFUSALS:
                            break
                assert refused >= REFUSALS and acked, (refused, len(acked))
                status, body, _ = await api.get("/readyz")
                assert status == 503 and "cannot persist" in body["detail"], body
                assert temp_files(data) == []
                # Every acknowledged event is there to read.
                for gid in list(acked)[:: max(1, len(acked) // 20)]:
                    status, page, _ = await api.get(f"/v1/guilds/{gid}/history")
                    assert status == 200 and [e["s"] for e in page["events"]] == [1], page

                # Space comes back: readiness follows without a publish.
                victims = [p for p in (data / GUILDS_DIR).iterdir()][: len(acked) // 2]
                for p in victims:
                    os.unlink(p)
                status = 0
                async with asyncio.timeout(30):  # the probe runs every second
                    while status != 200:
                        await asyncio.sleep(0.05)
                        status, body, _ = await api.get("/readyz")
                status, body, _ = await api.publish({"guild": "after", "t": "N", "d": 1})
                assert status == 200, body
            assert await node.terminate() == 0
            errors = [
                r
                for r in node.log_json()
                if r["level"] == "ERROR" and "journal write failed" in r["msg"]
            ]
        # Hundreds of failures, a few lines (one per 5 s, counting the rest).
        assert 1 <= len(errors) <= 3, len(errors)
        assert sum(r.get("suppressed", 0) for r in errors) + len(errors) <= refused + 1

        # A temp file a crash left behind is removed at start.
        (data / GUILDS_DIR / "g-crash.log.tmp").write_bytes(b"half a rewrite")
        async with serve_process(args, tmp_path / "run2.log") as node:
            assert temp_files(data) == []
