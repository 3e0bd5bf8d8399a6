"""The server under test: embedded in this process, a pinned child process, or
an already running server given by URL.

Owns the server process it starts (and only that one): it is started in its
own session (so the terminal's Ctrl-C reaches the harness, which then stops
it), pinned with ``os.sched_setaffinity`` to ``--server-cpus``, with its
open-files soft limit raised to the hard limit, and always stopped on exit:
SIGTERM (a graceful drain), then SIGKILL after a bounded wait.

Loopback only: a URL whose host is not a loopback address is refused before
anything connects (a load test aimed at someone else's server is an attack).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import sys
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import IO, Any
from urllib.parse import urlsplit

import psutil

#: Seconds a started server has to print its gateway URL.
START_TIMEOUT = 30.0
#: Seconds between SIGTERM and SIGKILL when stopping a server process
#: (its graceful drain is bounded by its own drain_timeout, 10 s by default).
STOP_TIMEOUT = 20.0
#: Lines of server output kept to explain a failure (bounded, oldest dropped).
OUTPUT_LINES = 200
#: Seconds a started redis-server has to accept connections.
REDIS_START_TIMEOUT = 30.0


class TargetError(Exception):
    """The target cannot be used (not loopback, failed to start, ...)."""


def loopback_host(url: str, what: str) -> tuple[str, int, str]:
    """``(host, port, path)`` of a ws/http URL whose host is loopback; else TargetError."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "http"):
        raise TargetError(f"{what}: only ws:// and http:// on loopback are supported, not {url!r}")
    host = parts.hostname or ""
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise TargetError(
            f"{what}: {host!r} is not a loopback address; the load tester only targets "
            "127.0.0.0/8 or ::1 (run it on the server's machine)"
        ) from None
    if not ip.is_loopback:
        raise TargetError(
            f"{what}: {host} is not a loopback address; the load tester only targets "
            "127.0.0.0/8 or ::1 (run it on the server's machine)"
        )
    port = parts.port or 80
    return host, port, parts.path or "/"


def raise_nofile() -> tuple[int, int]:
    """Raise this process's open-files soft limit to the hard limit; returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def parse_cpus(spec: str | None) -> list[int] | None:
    """``"0"``, ``"1,3"`` or ``"2-5"`` -> a CPU list; None or "" -> None."""
    if not spec:
        return None
    cpus: list[int] = []
    for part in spec.split(","):
        a, _, b = part.partition("-")
        cpus.extend(range(int(a), int(b or a) + 1))
    return cpus


@dataclass
class Target:
    """Where the harness connects, and what it knows of the server."""

    mode: str  # "embedded" | "process" | "external"
    host: str = "127.0.0.1"
    port: int = 0
    path: str = "/gateway"
    api_host: str | None = None
    api_port: int | None = None
    secret: str | None = None
    token: str | None = None
    api_key: str | None = None
    #: The server's pid when it is a separate process we know.
    pid: int | None = None
    #: Config values applied to the server (for the report).
    settings: dict[str, Any] = field(default_factory=dict)
    #: How sessions can be dropped mid-run: "disconnect_all", "restart" or "client".
    drop_modes: tuple[str, ...] = ("client",)
    #: Start the server's HTTP API too (``--via http``).
    want_api: bool = False

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{self.path}"

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def restart(self) -> None:
        raise TargetError(f"a {self.mode} server cannot be restarted by the harness")

    def disconnect_all(self, code: int) -> int:
        raise TargetError(f"a {self.mode} server cannot drop sessions from the harness")

    def server_stats(self) -> dict[str, Any] | None:
        return None


@dataclass
class ExternalTarget(Target):
    pass


@dataclass
class EmbeddedTarget(Target):
    """A :class:`server.Server` in this process and event loop."""

    config: dict[str, Any] = field(default_factory=dict)
    srv: Any = None

    async def start(self) -> None:
        from guildcast import Config, Server

        conf = dict(self.config)
        if self.want_api:
            self.api_key = self.api_key or secrets.token_urlsafe(16)
            conf.update(api_port=0, api_keys=(self.api_key,), api_publish_rate=0.0)
        cfg = Config(**conf)
        self.srv = Server(cfg)
        await self.srv.start()
        self.port = self.srv.port
        self.secret = self.srv.secret
        if self.want_api and self.srv.api_port:
            self.api_host, self.api_port = cfg.host, int(self.srv.api_port)
        self.settings = {k: getattr(cfg, k) for k in Config.field_names()}
        self.settings.pop("secret", None)
        self.pid = None  # our own process: not separable from the harness
        self.drop_modes = ("disconnect_all", "client")

    async def stop(self) -> None:
        if self.srv is not None:
            srv, self.srv = self.srv, None
            await srv.stop()

    def disconnect_all(self, code: int) -> int:
        return int(self.srv.disconnect_all(code, "loadtest"))

    def server_stats(self) -> dict[str, Any] | None:
        return dict(self.srv.stats()) if self.srv is not None else None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers that need a fixed one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """Linux, in a child between fork and exec: SIGTERM it if the harness dies
    without cleaning up (SIGKILL, a crash), so nothing it started outlives it.
    Best effort elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


async def stop_process(proc: asyncio.subprocess.Process | None) -> int | None:
    """SIGTERM (a graceful drain), SIGKILL after :data:`STOP_TIMEOUT`; the exit status."""
    if proc is None:
        return None
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    return proc.returncode


async def wait_port(port: int, timeout: float, proc: asyncio.subprocess.Process) -> None:
    """Until something accepts on 127.0.0.1:``port``; TargetError if ``proc``
    exits first or ``timeout`` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            pass
        if proc.returncode is not None:
            raise TargetError(f"the process on port {port} exited with {proc.returncode}")
        if loop.time() > deadline:
            raise TargetError(f"nothing listens on port {port} after {timeout:.0f} s")
        await asyncio.sleep(0.05)  # polling a port: nothing to be notified by


@dataclass
class RedisProcess:
    """A throwaway ``redis-server`` (no persistence) on a free loopback port,
    for cluster runs; stopped like the server (:func:`stop_process`)."""

    port: int = field(default_factory=free_port)
    proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise TargetError("redis-server is not installed (apt-get install redis-server)")
        self.proc = await asyncio.create_subprocess_exec(
            exe,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no"),
            stdout=asyncio.subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        await wait_port(self.port, REDIS_START_TIMEOUT, self.proc)

    async def stop(self) -> None:
        await stop_process(self.proc)


@dataclass
class ProcessTarget(Target):
    """``python -P -m guildcast.cli serve`` as a child process, pinned to ``cpus``.

    ``flags`` are ``serve`` options by Config name (``max_buffer=...`` is
    ``--max-buffer ...``; True is a bare flag, False or None leaves it out):
    the harness ships with the server, so it passes them as they are and
    ``serve`` refuses an unknown one (reported with its output). Its output
    is kept (the last :data:`OUTPUT_LINES` lines) and, with ``log_path``,
    appended to that file in full. With ``--workers N`` in ``flags`` give
    ``gateways=N`` and a fixed ``port``: the start waits for every worker.
    """

    flags: dict[str, Any] = field(default_factory=dict)
    cpus: list[int] | None = None
    data_dir: str | None = None
    log_path: str | None = None
    #: "gateway on" lines to wait for: one per worker process.
    gateways: int = 1
    proc: asyncio.subprocess.Process | None = None
    output: deque[str] = field(default_factory=lambda: deque(maxlen=OUTPUT_LINES))
    _reader: asyncio.Task[None] | None = None
    _log: IO[str] | None = None
    starts: int = 0
    #: "gateway on" lines seen so far (a worker started again prints one).
    listening: int = 0
    _listened: asyncio.Event | None = None

    async def start(self) -> None:
        self.secret = self.secret or secrets.token_urlsafe(24)
        # With --workers N (gateways > 1) a drop is a worker's: SIGTERM each
        # in turn (rolling) or kill -9 one; one node is restarted whole.
        if self.gateways > 1:
            self.drop_modes = ("rolling", "kill-worker", "client")
        else:
            self.drop_modes = ("restart", "kill", "client")
        if self.want_api:
            self.api_key = self.api_key or secrets.token_urlsafe(16)
            self.flags.setdefault("api_publish_rate", 0)
        await self._spawn()

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    @property
    def api_url(self) -> str:
        return f"http://{self.api_host or self.host}:{self.api_port}"

    def argv(self) -> list[str]:
        """The command line of the server (``-P``: nothing in the current
        directory can shadow the package)."""
        argv = [sys.executable, "-P", "-m", "guildcast.cli", "serve", "--host", self.host]
        # ``--flag=value``: a generated secret may begin with "-".
        argv += ["--port", str(self.port), f"--secret={self.secret}"]
        for name, value in self.flags.items():
            if value is None or value is False:
                continue
            flag = "--" + name.replace("_", "-")
            argv.append(flag if value is True else f"{flag}={value}")
        # Always explicit: serve's default API port (8081) may be taken.
        if not self.want_api:
            argv += ["--api-port", "-1"]
        else:
            argv += ["--api-port", str(self.api_port or 0), f"--api-key={self.api_key}"]
        if self.data_dir:
            argv += ["--data-dir", self.data_dir]
        return argv

    def _keep(self, line: bytes) -> str:
        text = line.decode("utf-8", "replace").rstrip()
        self.output.append(text)
        # Counted, not tested: the workers of ``--workers N`` share the pipe,
        # and two "gateway on" lines written at once can arrive as one.
        seen = text.count("gateway on ws://")
        if seen:
            self.listening += seen
            if self._listened is not None:
                self._listened.set()
        if self._log is not None:
            self._log.write(text + "\n")
            self._log.flush()
        return text

    async def _spawn(self) -> None:
        cpus = self.cpus

        def preexec() -> None:  # runs in the child between fork and exec
            die_with_parent()
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft < hard:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            if cpus:
                os.sched_setaffinity(0, cpus)

        # The server is configured by its flags alone, not by the caller's
        # GUILDCAST_* environment.
        env = {k: v for k, v in os.environ.items() if not k.startswith("GUILDCAST_")}
        env["GUILDCAST_LOG_LEVEL"] = os.environ.get("GUILDCAST_LOG_LEVEL", "WARNING")
        env["PYTHONUNBUFFERED"] = "1"
        if self.log_path and self._log is None:
            # A local file opened once per start (no waiting on it).
            self._log = open(self.log_path, "a")  # noqa: ASYNC230
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            preexec_fn=preexec,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.starts += 1
        assert self.proc.stdout is not None
        # The path ends where another worker's line may begin (lines can merge).
        url_re = re.compile(r"gateway on ws://([^:/]+|\[[^\]]+\]):(\d+)(/\S*?)(?=guildcast:|\s|$)")
        api_re = re.compile(r"api on http://([^:/]+|\[[^\]]+\]):(\d+)")
        gateways_seen = 0
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while gateways_seen < self.gateways or (self.want_api and not self.api_port):
                    line = await self.proc.stdout.readline()
                    if not line:
                        raise TargetError(
                            "the server exited before listening:\n" + "\n".join(self.output)
                        )
                    text = self._keep(line)
                    for gm in url_re.finditer(text):  # two workers' lines may arrive as one
                        self.port = int(gm.group(2))
                        self.path = gm.group(3)
                        gateways_seen += 1
                    am = api_re.search(text)
                    if am:
                        self.api_host = self.host
                        self.api_port = int(am.group(2))
        except TimeoutError:
            await stop_process(self.proc)
            raise TargetError(
                f"the server printed no gateway URL within {START_TIMEOUT:.0f} s:\n"
                + "\n".join(self.output)
            ) from None
        except TargetError:
            await stop_process(self.proc)
            raise
        self._reader = asyncio.get_running_loop().create_task(self._drain_output())

    async def _drain_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self._keep(line)

    async def stop(self) -> None:
        await stop_process(self.proc)
        if self._reader is not None:
            # The output ends with the process: read it to the end.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reader, STOP_TIMEOUT)
            self._reader = None
        if self._log is not None:
            self._log.close()
            self._log = None

    async def restart(self) -> None:
        """Stop (graceful: RECONNECT and 1001 to every session) and start again
        on the same port (and data directory)."""
        await self.stop()
        await self._spawn()

    async def kill_restart(self) -> None:
        """kill -9 (no drain, no flush) and start again on the same port and
        data directory."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reader, STOP_TIMEOUT)
            self._reader = None
        await self._spawn()

    async def rolling_restart(
        self,
        kill: bool = False,
        timeout: float = 60.0,
        settled: Callable[[], Awaitable[object]] | None = None,
    ) -> int:
        """``--workers N``: SIGTERM each worker in turn (the supervisor starts
        it again), each one once ``settled`` has returned (the clients moved
        by the one before are back: docs/OPERATIONS.md "Deploying without a
        reconnect storm"), so two workers' clients never move at once, and
        wait until its replacement listens; with ``kill``, kill -9 one
        worker only. Returns the workers stopped."""
        sup = psutil.Process(self.pid)
        olds = sorted(sup.children(), key=lambda c: c.create_time())
        if kill:
            olds = olds[:1]
        for old in olds:
            if settled is not None:
                await settled()
            seen = self.listening
            old.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            ev = self._listened = asyncio.Event()
            async with asyncio.timeout(timeout):
                while self.listening <= seen:
                    ev.clear()
                    await ev.wait()
        return len(olds)
