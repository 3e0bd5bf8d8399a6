"""Running out of file descriptors (issue "Hardening 3", item 8): a
``guildcast serve`` process with a low ``RLIMIT_NOFILE`` is sent
connections until it turns them away. It must say so: a rate-limited ERROR
line and ``guildcast_descriptors_exhausted_total`` on /metrics (the
gateway's acceptor, server/transport/acceptor.py, turns such connections
away through a reserve descriptor and tells the watch in
server/core/fdwatch.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import sys
from pathlib import Path

import orjson

from tests.integration.raw import RawWs
from tests.support.api import KEY, Api
from tests.support.node import SECRET
from tests.support.wait import TIMEOUT, until

ROOT = Path(__file__).resolve().parents[2]

#: The child's descriptor limit: a few dozen connections exhaust it.
LIMIT = 96
#: Connections tried at most (the limit is reached long before).
MAX_CONNECTIONS = 400


def low_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


async def handshake(port: int) -> RawWs | None:
    """A WebSocket upgrade; None if the server dropped the connection."""
    try:
        sock = await RawWs.open(port)
    except (OSError, TimeoutError):
        return None
    try:
        async with asyncio.timeout(5):
            status = await sock.handshake()
    except (OSError, TimeoutError, AssertionError, IndexError, ValueError):
        sock.close()
        return None
    if status != 101:
        sock.close()
        return None
    return sock


async def test_running_out_of_descriptors_is_logged_and_counted(tmp_path: Path) -> None:
    log_path = tmp_path / "serve.log"
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "guildcast.cli",
            "serve",
            "--port",
            "0",
            "--api-port",
            "0",
            "--secret",
            SECRET,
            "--api-key",
            KEY,
            "--log-format",
            "json",
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            cwd=ROOT,
            preexec_fn=low_limit,
        )
    finally:
        os.close(log)
    socks: list[RawWs] = []
    try:
        assert proc.stdout is not None
        url = api_url = ""
        async with asyncio.timeout(TIMEOUT):
            while not (url and api_url):
                line = (await proc.stdout.readline()).decode()
                assert line, log_path.read_text()
                if m := re.match(r"guildcast: gateway on ws://127\.0\.0\.1:(\d+)", line):
                    url = m.group(1)
                elif m := re.match(r"guildcast: api on (\S+)", line):
                    api_url = m.group(1)
        port = int(url)
        dropped = 0
        for _ in range(MAX_CONNECTIONS):
            sock = await handshake(port)
            if sock is None:
                dropped += 1
                if dropped >= 20:
                    break
            else:
                socks.append(sock)
        assert dropped >= 20 and len(socks) < LIMIT, (dropped, len(socks))

        # The watch probes once a second: wait for its line, bounded.
        def lines() -> list[dict[str, object]]:
            out = []
            for ln in log_path.read_text().splitlines():
                if ln.startswith("{"):
                    rec = orjson.loads(ln)
                    if "out of file descriptors" in str(rec.get("msg")):
                        out.append(rec)
            return out

        await until(lambda: bool(lines()), "the out-of-descriptors line")
        # Free descriptors so the API can answer the scrape.
        for sock in socks[: len(socks) // 2]:
            sock.close()
        del socks[: len(socks) // 2]
        async with Api(api_url) as api:
            text = b""
            async with asyncio.timeout(TIMEOUT):
                while b"guildcast_descriptors_exhausted_total" not in text:
                    with contextlib.suppress(OSError, TimeoutError):
                        _, text, _ = await api.get("/metrics")
                    await asyncio.sleep(0.1)
        m = re.search(rb"^guildcast_descriptors_exhausted_total (\S+)$", text, re.M)
        assert m is not None and float(m.group(1)) >= 1, text[-2000:]
        limit = re.search(rb"^guildcast_descriptor_limit (\S+)$", text, re.M)
        assert limit is not None and float(limit.group(1)) == LIMIT
        found = lines()
        # rate-limited: one line per 5 s however many probes failed
        assert 1 <= len(found) <= 3, found
        assert found[0]["level"] == "ERROR" and found[0]["limit"] == LIMIT
    finally:
        for sock in socks:
            sock.close()
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
