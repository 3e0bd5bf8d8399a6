"""Handles on the subscriber fleets: in this process, or in spawned workers.

Owns the worker processes the harness starts. Both handles take the same
commands and yield the same reports (see :mod:`loadtest.fleet`):

- :class:`InlineWorker` runs the fleet in the controller's event loop (the
  default for ``--workers 1``, and what the tests use);
- :class:`ProcessWorker` runs it in a process started with the ``spawn``
  method, talks to it over a pipe, and always ends it: a ``close`` command,
  then ``terminate`` and ``kill`` after bounded waits.

Reports from a process arrive every ``report_interval``; they are buffered
here until the controller collects them (bounded: a controller that stops
collecting would make the pipe, not this buffer, fill up, since reports are
read only when collected or when waiting for the final one).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from typing import Any

from guildcast.loadtest.fleet import Fleet, FleetSpec, worker_main

#: Seconds a worker process has to start and say so.
START_TIMEOUT = 60.0
#: Seconds a closing worker has to send its final report and exit.
STOP_TIMEOUT = 15.0
#: Reports kept when the controller is slow to collect (oldest merged away
#: is not possible for histograms, so the bound is generous and only a
#: safety net: the controller collects twice a second).
MAX_BUFFERED_REPORTS = 1000


class InlineWorker:
    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        self.fleet = Fleet(spec)
        self.pid: int | None = None
        self.final: dict[str, Any] | None = None

    async def start(self) -> None:
        import os

        self.pid = os.getpid()
        await self.fleet.__aenter__()

    def send(self, cmd: dict[str, Any]) -> None:
        self.fleet.command(cmd)

    def delivered_now(self) -> int:
        return self.fleet.delivered

    def collect(self) -> list[dict[str, Any]]:
        return [self.fleet.report()]

    async def close(self) -> dict[str, Any]:
        if self.final is None:
            await self.fleet.shutdown()
            self.final = self.fleet.report()
        return self.final


class ProcessWorker:
    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe(duplex=True)
        #: The worker's delivered count, updated on every read (flow control).
        self.shared = ctx.RawValue("q", 0)
        self.proc = ctx.Process(
            target=worker_main,
            args=(child, spec, self.shared),
            name=f"loadtest-worker-{spec.wid}",
            daemon=True,
        )
        self._child = child
        self.pid: int | None = None
        self.buffer: list[dict[str, Any]] = []
        self.final: dict[str, Any] | None = None

    async def start(self) -> None:
        self.proc.start()
        self._child.close()
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            # The controller's ticker may read "started" first (``_read``).
            if self.pid is not None:
                return
            if await asyncio.to_thread(self.conn.poll, 0.2):
                msg = self.conn.recv()
                if msg.get("cmd") == "started":
                    self.pid = int(msg["pid"])
                    return
            if not self.proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.spec.wid} did not start")

    def send(self, cmd: dict[str, Any]) -> None:
        self.conn.send(cmd)

    def delivered_now(self) -> int:
        return int(self.shared.value)

    def _read(self) -> None:
        with contextlib.suppress(EOFError, OSError):
            while self.conn.poll():
                msg = self.conn.recv()
                if msg.get("final"):
                    self.final = msg
                elif msg.get("cmd") == "started":
                    self.pid = int(msg["pid"])  # read by the ticker while start() waits
                elif len(self.buffer) < MAX_BUFFERED_REPORTS:
                    self.buffer.append(msg)

    def collect(self) -> list[dict[str, Any]]:
        self._read()
        out, self.buffer = self.buffer, []
        return out

    async def close(self) -> dict[str, Any]:
        if self.final is None and self.proc.is_alive():
            with contextlib.suppress(OSError):
                self.conn.send({"cmd": "close"})
            deadline = time.monotonic() + STOP_TIMEOUT
            while self.final is None and time.monotonic() < deadline and self.proc.is_alive():
                await asyncio.to_thread(self.conn.poll, 0.2)
                self._read()
            self._read()
        await self.kill()
        if self.final is None:
            raise RuntimeError(f"worker {self.spec.wid} ended without a final report")
        return self.final

    async def kill(self) -> None:
        """End the process whatever its state: join, terminate, kill."""
        if self.proc.pid is None:
            return
        await asyncio.to_thread(self.proc.join, 3.0)
        if self.proc.is_alive():
            self.proc.terminate()
            await asyncio.to_thread(self.proc.join, 3.0)
        if self.proc.is_alive():
            self.proc.kill()
            await asyncio.to_thread(self.proc.join, 3.0)
        with contextlib.suppress(OSError):
            self.conn.close()


Worker = InlineWorker | ProcessWorker
