"""Cluster operations with a real redis-server and real ``guildcast serve``
processes: a node started before its Redis waits and says not-ready instead
of crash-looping; ``--workers N`` gives each worker its own API port with
node-labelled metrics and prints the demo link; and its workers die with the
supervisor even when it is killed with SIGKILL (issue "Hardening 3" item 7).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from guildcast.client import Client
from tests.clients.test_demo_static import http_get
from tests.support.redis import RedisProc, free_port
from tests.test_cli import SECRET, TIMEOUT, clean_env, serve

KEY = "ops-key-0123456789abcdef0123456789"


async def get(url: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as http,
        http.get(url, headers={"Authorization": f"Bearer {KEY}"}) as r,
    ):
        return r.status, await r.text()


async def until_status(url: str, status: int, contains: str = "") -> str:
    """Poll ``url`` (bounded) until it answers ``status`` with ``contains``."""
    last: tuple[int, str] | None = None
    for _ in range(int(TIMEOUT / 0.05)):
        try:
            last = await get(url)
        except aiohttp.ClientError:
            last = None
        if last is not None and last[0] == status and contains in last[1]:
            return last[1]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered {status} {contains!r}; last {last}")


async def test_a_node_started_before_its_redis_waits_not_ready(tmp_path: Path) -> None:
    redis = RedisProc(tmp_path)  # its port is chosen; nothing listens there yet
    api_port = free_port()
    env = clean_env(tmp_path)
    args = ["--port", "0", "--api-port", str(api_port), "--secret", SECRET, "--api-key", KEY]
    async with serve(env, *args, "--redis", redis.url, "--metrics-open") as s:
        try:
            base = f"http://127.0.0.1:{api_port}"
            body = await until_status(base + "/readyz", 503, "waiting for the broker")
            assert str(redis.port) in body
            _, metrics = await get(base + "/metrics")
            assert "guildcast_ready 0.0" in metrics
            status, _ = await get(base + "/v1/guilds/g")
            assert status == 503
            assert s.proc.returncode is None  # still there, not crash-looping
            redis.start()
            port = int((await s.expect(r"gateway on ws://127\.0\.0\.1:(\d+)")).group(1))
            await until_status(base + "/readyz", 200)
            status, _, _ = await http_get(port, "/readyz")
            assert status == 200
            async with Client(f"ws://127.0.0.1:{port}/gateway", _token("u")) as c:
                assert await c.publish("g", "E", {}) == 1
            # Redis going away later: not ready on the gateway port too.
            redis.stop()
            for _ in range(int(TIMEOUT / 0.05)):
                status, _, body = await http_get(port, "/readyz")
                if status == 503:
                    break
                await asyncio.sleep(0.05)
            # Whichever the node notices first: the command link or the feed.
            assert status == 503, body
            assert b"broker unavailable" in body or b"broker feed dead" in body, body
            assert await s.stop() == 0
        finally:
            redis.stop()


def _token(sub: str) -> str:
    from guildcast.core.tokens import make_token

    return make_token(SECRET, sub, ["*"], ["*"], None, 3600)


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        # SO_REUSEADDR so connections in TIME_WAIT do not count; without
        # SO_REUSEPORT any listener left (an orphaned worker) makes this fail.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) is gone for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_workers_per_node_metrics_and_death_with_the_supervisor(tmp_path: Path) -> None:
    redis = RedisProc(tmp_path)
    redis.start()
    port, api_port = free_port(), free_port()
    env = clean_env(tmp_path)
    args = ["--workers", "2", "--port", str(port), "--api-port", str(api_port)]
    pids: list[int] = []
    try:
        async with serve(env, *args, "--redis", redis.url, "--api-key", KEY) as s:
            m = await s.expect(r"supervising 2 workers: \[(\d+), (\d+)\]")
            pids += [int(m.group(1)), int(m.group(2))]
            # No --secret: the supervisor prints the demo link one node prints.
            m = await s.expect(rf"live demo board: http://127\.0\.0\.1:{port}/#token=([^&\s]+)")
            demo_token = m.group(1)
            nodes: dict[str, int] = {}
            while len(nodes) < 2:
                m = await s.expect(r"node (\S+) own API at http://127\.0\.0\.1:(\d+)")
                nodes[m.group(1)] = int(m.group(2))
                s.lines.remove(m.string)
            assert len(set(nodes.values())) == 2 and api_port not in nodes.values()
            for node, node_port in nodes.items():
                base = f"http://127.0.0.1:{node_port}"
                await until_status(base + "/readyz", 200)
                _, text = await get(base + "/metrics")
                labels = [
                    smp.labels.get("node")
                    for fam in text_string_to_metric_families(text)
                    for smp in fam.samples
                ]
                assert labels and set(labels) == {node}, (node, set(labels))
            async with Client(f"ws://127.0.0.1:{port}/gateway", demo_token) as c:
                assert c.user == "demo"

            # SIGKILL: the supervisor can forward nothing; the workers go anyway.
            s.proc.send_signal(signal.SIGKILL)
            await s.proc.wait()
            for _ in range(int(TIMEOUT / 0.1)):  # bounded poll
                if not any(_alive(p) for p in pids) and _port_is_free(port):
                    break
                await asyncio.sleep(0.1)
            assert len(pids) == 2 and not any(_alive(p) for p in pids), "orphaned workers"
            assert _port_is_free(port) and _port_is_free(api_port)
            assert all(_port_is_free(p) for p in nodes.values())
    finally:
        for p in pids:  # only if the test failed: no orphan outlives it
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        redis.stop()
