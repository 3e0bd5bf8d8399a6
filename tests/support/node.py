"""A node to test against: embedded in the test's process, or a real
``guildcast serve`` process.

- :func:`node` / :func:`api_server`: an embedded :class:`~guildcast.Server`
  on 127.0.0.1 and a free port (with its HTTP API for :func:`api_server`);
- :class:`Restartable` / :func:`restartable`: an embedded node that
  restarts on the same port, and :func:`control_endpoint`, a tiny HTTP
  endpoint through which an out-of-process test (Node) drives it;
- :class:`ServeProcess` / :func:`serve_process`: ``guildcast serve`` as a
  child process (``sys.executable -P -m guildcast.cli``: nothing in the
  current directory can shadow the package), its ports learned from its
  output, restartable on them; :func:`cluster_node` is one over Redis.

Every node accepts tokens signed with :data:`SECRET` and (with its API) the
key :data:`~tests.support.api.KEY`. Every wait is bounded by
:data:`~tests.support.wait.TIMEOUT`; every process is killed on exit.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from guildcast import Config, Server
from tests.support.api import KEY, Api
from tests.support.wait import TIMEOUT

__all__ = ["KEY", "SECRET", "TIMEOUT"]

#: The token secret of every test node.
SECRET = "test-secret-0123456789abcdef0123456789"


@asynccontextmanager
async def node(*, api: bool = False, **settings: Any) -> AsyncIterator[Server]:
    """An embedded node on 127.0.0.1 (a free port), ``settings`` over the
    defaults; with ``api``, its HTTP API on a free port, accepting :data:`KEY`."""
    if api:
        settings.setdefault("api_port", 0)
        settings.setdefault("api_keys", (KEY,))
    settings.setdefault("host", "127.0.0.1")
    settings.setdefault("port", 0)
    settings.setdefault("secret", SECRET)
    async with Server(Config(**settings)) as srv:
        yield srv


def api_server(**settings: Any) -> AbstractAsyncContextManager[Server]:
    """An embedded node with its HTTP API (:func:`node` with ``api=True``)."""
    return node(api=True, **settings)


class Restartable:
    """An embedded server that :meth:`restart` stops (drain: RECONNECT + 1001)
    and starts again on the same port with the same secret."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.srv = Server(config)

    async def start(self) -> None:
        await self.srv.start()
        # Later incarnations listen on the port the first one got.
        self.config = replace(self.config, port=self.srv.port)

    async def restart(self) -> None:
        await self.srv.stop()
        self.srv = Server(self.config)
        await self.srv.start()

    async def stop(self) -> None:
        await self.srv.stop()

    @property
    def url(self) -> str:
        return self.srv.url


@asynccontextmanager
async def restartable(**overrides: Any) -> AsyncIterator[Restartable]:
    cfg = Config(host="127.0.0.1", port=0, secret=SECRET, **overrides)
    r = Restartable(cfg)
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@asynccontextmanager
async def control_endpoint(r: Restartable) -> AsyncIterator[str]:
    """Serve ``GET /publish?guild=G&from=A&to=B`` (publishes events ``N`` with
    data A..B), ``GET /disconnect?code=C`` and ``GET /restart`` on loopback;
    yields the base URL. One request per connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode()
            url = urllib.parse.urlsplit(target)
            q = dict(urllib.parse.parse_qsl(url.query))
            status, body = 200, b""
            if url.path == "/publish":
                ss = [
                    await r.srv.publish(q["guild"], "N", n)
                    for n in range(int(q["from"]), int(q["to"]) + 1)
                ]
                body = orjson.dumps({"s": ss})
            elif url.path == "/disconnect":
                body = orjson.dumps({"closed": r.srv.disconnect_all(int(q["code"]), "test")})
            elif url.path == "/restart":
                await r.restart()
                body = orjson.dumps({"port": r.srv.port})
            else:
                status, body = 404, b'{"error": "unknown path"}'
            writer.write(
                b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (status, len(body), body)
            )
            await writer.drain()
        finally:
            writer.close()

    ctl = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = ctl.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        ctl.close()
        await ctl.wait_closed()


class ServeProcess:
    """``guildcast serve`` as a child process, ports learned from its output.

    stderr (the log) goes to ``log_path``; stdout is read (and kept in
    :attr:`stdout`) for the ``guildcast: gateway on ...`` and ``guildcast:
    api on ...`` lines. Without ``api`` the node has no HTTP API; with
    ``secret=None`` it generates its own (and prints a demo token).
    :meth:`restart` starts it again on the same ports.
    """

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        *,
        api: bool = True,
        secret: str | None = SECRET,
        node_id: str | None = None,
    ) -> None:
        self.args = args
        #: The ``--node-id`` it was given, if any (a cluster node).
        self.node_id = node_id
        self.log_path = log_path
        self.api = api
        self.secret = secret
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.api_port = 0
        self.url = ""
        self.api_url = ""
        self.stdout: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    def argv(self) -> list[str]:
        argv = [sys.executable, "-P", "-m", "guildcast.cli", "serve"]
        argv += ["--host", "127.0.0.1", "--port", str(self.port)]
        if self.secret is not None:
            argv.append(f"--secret={self.secret}")
        if self.api:
            argv += ["--api-port", str(self.api_port), f"--api-key={KEY}"]
        else:
            argv += ["--api-port", "-1"]
        return argv + self.args

    async def start(self) -> ServeProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GUILDCAST_")}
        env["PYTHONUNBUFFERED"] = "1"
        # A serve with no --secret keeps its generated one in a state file:
        # in the test's folder, never in the real home.
        env["XDG_STATE_HOME"] = str(self.log_path.parent / "state")
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv(), stdout=asyncio.subprocess.PIPE, stderr=log, env=env
            )
        finally:
            os.close(log)
        assert self.proc.stdout is not None
        self.url = self.api_url = ""
        async with asyncio.timeout(TIMEOUT):
            while not (self.url and (self.api_url or not self.api)):
                line = (await self.proc.stdout.readline()).decode()
                assert line, f"serve exited early; log:\n{self.log()}"
                self.stdout.append(line)
                if m := re.match(r"guildcast: gateway on (\S+)", line):
                    self.url = m.group(1)
                    self.port = urllib.parse.urlsplit(self.url).port or 0
                elif m := re.match(r"guildcast: api on (\S+)", line):
                    self.api_url = m.group(1)
                    self.api_port = urllib.parse.urlsplit(self.api_url).port or 0
        self._reader = asyncio.create_task(self._drain_stdout())
        return self

    async def _drain_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.stdout.append(line.decode())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_json(self) -> list[dict[str, Any]]:
        """The log as JSON lines (start it with ``--log-format json``)."""
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                out.append(orjson.loads(line))
        return out

    async def get(self, path: str) -> tuple[int, Any]:
        """GET an API path with :data:`KEY`; returns (status, JSON or text body)."""
        async with Api(self.api_url) as api:
            status, body, _ = await api.get(path)
        return status, body.decode() if isinstance(body, bytes) else body

    async def kill(self) -> None:
        """SIGKILL: no drain, no flush; what is on disk is what the kernel has."""
        assert self.proc is not None
        self.proc.kill()
        await self.wait()

    async def terminate(self) -> int:
        """SIGTERM (a graceful drain); the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await self.wait()

    async def wait(self) -> int:
        assert self.proc is not None
        async with asyncio.timeout(TIMEOUT):
            rc = await self.proc.wait()
        if self._reader is not None:
            async with asyncio.timeout(TIMEOUT):
                await self._reader
        return rc

    async def restart(self) -> None:
        """Drain (SIGTERM), then start again on the same ports."""
        await self.terminate()
        await self.start()

    async def close(self) -> None:
        """Kill it if it still runs (for ``finally``)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()


@asynccontextmanager
async def serve_process(args: list[str], log_path: Path, **kw: Any) -> AsyncIterator[ServeProcess]:
    """A started :class:`ServeProcess` (``kw``: its keyword options), killed on exit."""
    p = ServeProcess(args, log_path, **kw)
    try:
        yield await p.start()
    finally:
        await p.close()


def cluster_node(redis_url: str, node_id: str, log_path: Path, *extra: str) -> ServeProcess:
    """``guildcast serve --redis ...`` as node ``node_id`` (not started),
    with a 2 s presence timeout, so a killed node's members expire quickly."""
    args = ["--redis", redis_url, "--node-id", node_id, "--presence-timeout", "2"]
    return ServeProcess([*args, "--log-level", "WARNING", *extra], log_path, node_id=node_id)


@asynccontextmanager
async def cluster_nodes(
    redis_url: str, log_dir: Path, n: int, *extra: str
) -> AsyncIterator[list[ServeProcess]]:
    """``n`` started :func:`cluster_node` processes ``node0`` ... on one
    Redis, each logging to ``log_dir/nodeI.log``; all closed on exit."""
    procs = [
        cluster_node(redis_url, f"node{i}", log_dir / f"node{i}.log", *extra) for i in range(n)
    ]
    try:
        for p in procs:
            await p.start()
        yield procs
    finally:
        for p in procs:
            await p.close()
