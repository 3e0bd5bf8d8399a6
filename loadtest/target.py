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
import importlib.util
import ipaddress
import os
import re
import resource
import secrets
import signal
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

#: Seconds a started server has to print its gateway URL.
START_TIMEOUT = 30.0
#: Seconds between SIGTERM and SIGKILL when stopping a server process
#: (its graceful drain is bounded by its own drain_timeout, 10 s by default).
STOP_TIMEOUT = 20.0
#: Lines of server output kept to explain a failure (bounded, oldest dropped).
OUTPUT_LINES = 200


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
            if "api_port" not in Config.field_names():
                raise TargetError("this server has no HTTP API (Config.api_port)")
            self.api_key = self.api_key or secrets.token_urlsafe(16)
            conf.update(api_port=0, api_keys=(self.api_key,), api_publish_rate=0.0)
        cfg = Config(**conf)
        self.srv = Server(cfg)
        await self.srv.start()
        self.port = self.srv.port
        self.secret = self.srv.secret
        api_port = getattr(self.srv, "api_port", None)
        if self.want_api and api_port:
            self.api_host, self.api_port = cfg.host, int(api_port)
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


def server_flags(python: str = sys.executable) -> set[str]:
    """The ``--flags`` this checkout's ``guildcast serve`` accepts."""
    out = subprocess.run(
        [python, "-m", "guildcast.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=_repo_root(),
        check=False,
    ).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", out))


def _die_with_parent() -> None:
    """Linux: SIGTERM this (child) process if the harness dies without cleaning
    up (SIGKILL, a crash), so no server outlives it. Best effort elsewhere."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _repo_root() -> str:
    spec = importlib.util.find_spec("server")
    if spec is None or not spec.submodule_search_locations:
        raise TargetError("the server package is not importable; install guildcast first")
    return str(Path(next(iter(spec.submodule_search_locations))).parent)


@dataclass
class ProcessTarget(Target):
    """``python -m guildcast.cli serve`` as a child process, pinned to ``cpus``."""

    flags: dict[str, Any] = field(default_factory=dict)
    cpus: list[int] | None = None
    data_dir: str | None = None
    proc: asyncio.subprocess.Process | None = None
    output: deque[str] = field(default_factory=lambda: deque(maxlen=OUTPUT_LINES))
    _reader: asyncio.Task[None] | None = None
    available: set[str] = field(default_factory=set)
    starts: int = 0

    async def start(self) -> None:
        self.available = await asyncio.to_thread(server_flags)
        if "--secret" not in self.available:
            raise TargetError("this server's `serve` has no --secret flag")
        self.secret = self.secret or secrets.token_urlsafe(24)
        self.drop_modes = ("restart", "client") if "--data-dir" in self.available else ("client",)
        if self.want_api:
            if "--api-port" not in self.available:
                raise TargetError("this server's `serve` has no --api-port (no HTTP API)")
            self.api_key = self.api_key or secrets.token_urlsafe(16)
            self.flags.setdefault("api_publish_rate", 0)
        await self._spawn()

    def _argv(self) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "guildcast.cli",
            "serve",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--secret",
            str(self.secret),
        ]
        for name, value in self.flags.items():
            flag = "--" + name.replace("_", "-")
            if flag not in self.available:
                raise TargetError(f"this server's `serve` has no {flag} flag")
            argv += [flag, str(value)]
        if "--api-port" in self.available:
            # Always explicit: serve's default API port (8081) may be taken.
            if not self.want_api:
                argv += ["--api-port", "-1"]
            else:
                argv += ["--api-port", str(self.api_port or 0), "--api-key", str(self.api_key)]
        if self.data_dir and "--data-dir" in self.available:
            argv += ["--data-dir", self.data_dir]
        return argv

    async def _spawn(self) -> None:
        cpus = self.cpus

        def preexec() -> None:  # runs in the child between fork and exec
            _die_with_parent()
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            if soft < hard:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            if cpus:
                os.sched_setaffinity(0, cpus)

        env = dict(os.environ)
        env.setdefault("GUILDCAST_LOG_LEVEL", "WARNING")
        self.proc = await asyncio.create_subprocess_exec(
            *self._argv(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=_repo_root(),
            env=env,
            preexec_fn=preexec,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        self.starts += 1
        assert self.proc.stdout is not None
        url_re = re.compile(r"gateway on ws://([^:/]+|\[[^\]]+\]):(\d+)(/\S*)")
        api_re = re.compile(r"api on http://([^:/]+|\[[^\]]+\]):(\d+)")
        gateway_seen = False
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while not gateway_seen or (self.want_api and not self.api_port):
                    line = await self.proc.stdout.readline()
                    if not line:
                        raise TargetError(
                            "the server exited before listening:\n" + "\n".join(self.output)
                        )
                    text = line.decode("utf-8", "replace").rstrip()
                    self.output.append(text)
                    m = url_re.search(text)
                    if m:
                        self.port = int(m.group(2))
                        self.path = m.group(3)
                        gateway_seen = True
                    m = api_re.search(text)
                    if m:
                        self.api_host = self.host
                        self.api_port = int(m.group(2))
        except TimeoutError:
            await self._kill()
            raise TargetError(
                f"the server printed no gateway URL within {START_TIMEOUT:.0f} s:\n"
                + "\n".join(self.output)
            ) from None
        self._reader = asyncio.get_running_loop().create_task(self._drain_output())

    async def _drain_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.output.append(line.decode("utf-8", "replace").rstrip())

    async def _kill(self) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        await self._kill()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None

    async def restart(self) -> None:
        """Stop (graceful: RECONNECT and 1001 to every session) and start again
        on the same port (and data directory)."""
        await self.stop()
        await self._spawn()
