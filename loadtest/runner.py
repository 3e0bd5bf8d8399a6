"""One load-test run, from starting the server to the result.

Owns the run's phases and everything started for it: the target server (via
:mod:`loadtest.target`), the subscriber workers, the publishers and the
monitor's ticker. Every one of them is stopped in ``finally`` whatever
happened (an error, a timeout, Ctrl-C), in the reverse order of starting.

Phases, each bounded in time:

1. connect: every client connects, identifies and subscribes
   (``--connect-timeout``);
2. publish (or, for ``connect``, idle then one probe event per guild):
   ``--duration`` seconds, with the scenario's action (slow consumers stop
   reading, churn, sessions dropped at ``--reconnect-at``);
3. drain: publishers stop and collect their last ACKs; every client that
   should be connected is; every subscriber must reach the highest
   acknowledged ``s`` of its guild (``--drain-timeout``); slow consumers
   then read again and their close codes are counted.

The result is a plain dict (the ``--json`` output); ``checks`` holds the
scenario's invariants and ``ok`` is true only if all of them hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import platform
import signal
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from guildcast.loadtest import target as tgt
from guildcast.loadtest.fleet import FleetSpec, new_hist
from guildcast.loadtest.monitor import TICK, Mark, Monitor, ProcSampler, percentiles
from guildcast.loadtest.publish import (
    GatewayPublisher,
    HttpPublisher,
    Load,
    PubStats,
    ack_hist,
)
from guildcast.loadtest.report import Progress
from guildcast.loadtest.scenarios import CLUSTER_WORKERS, RECOVERY, Plan, assign, worker_cpus
from guildcast.loadtest.wire import mint
from guildcast.loadtest.workers import InlineWorker, ProcessWorker

#: A process runnable (on a CPU, or waiting for one) more than this share of
#: the time always had work: it is the bottleneck. On a machine with other
#: load its CPU share alone stays lower, so CPU + run-queue wait is the test.
SATURATED_PCT = 90.0
#: A process that waited longer than this share of the time for a CPU was
#: competing with other load (Linux schedstat run delay).
CONTENDED_PCT = 20.0
#: Seconds slow consumers get, once reading again, to show how they were closed.
SLOW_RESUME_TIMEOUT = 8.0
#: A restart's storm must recover every client within this many times a
#: cold start of the same clients (issue "reconnect storms").
STORM_RATIO = 2.0
#: Extra server RSS allowed over slow consumers x max_buffer (allocator
#: slack, history, fast clients' in-flight bytes) before "bounded" fails.
RSS_SLACK = 96 * 1024 * 1024
#: File descriptors a process needs besides its connections.
FD_MARGIN = 64


@dataclass
class TargetOptions:
    server: str = "process"  # embedded | process | external
    url: str | None = None
    api_url: str | None = None
    secret: str | None = None
    token: str | None = None
    api_key: str | None = None
    server_pid: int | None = None
    server_cpus: list[int] | None = None
    client_cpus: list[int] | None = None
    server_opts: dict[str, Any] = field(default_factory=dict)
    #: A single fleet (``--workers 1``) in its own process (True), in the
    #: harness's (False), or None: its own unless the server is embedded.
    spawn: bool | None = None
    #: A file the server process's output is appended to (``--server-log``).
    server_log: str | None = None


def inline_fleet(workers: int, topts: TargetOptions) -> bool:
    """Whether the one subscriber fleet runs in the harness's own process.

    Only with ``--inline``, or by default with an embedded server (which
    shares that loop anyway). Otherwise it gets its own process so that the
    publishers' loop is free: sharing a loop with the fleet, a publisher
    sends only between two passes over every subscriber's socket, so the
    server receives its window of events at once and writes them as one
    run, cheaper per delivery than the referee's publisher, which sends
    each event as its window opens (-41% against the referee's server CPU
    per delivery on s1 inline; docs/BENCHMARKS.md, "our own harness").
    """
    if workers != 1:
        return False
    if topts.spawn is None:
        return topts.server == "embedded"
    return not topts.spawn


class Run:
    def __init__(self, plan: Plan, topts: TargetOptions, progress: Progress, command: str) -> None:
        self.plan = plan
        self.topts = topts
        self.ui = progress
        self.command = command
        self.monitor = Monitor()
        self.pubstats = PubStats()
        self.target: tgt.Target | None = None
        self.workers: list[InlineWorker | ProcessWorker] = []
        self.finals: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.aborted: str | None = None
        self.phase = "setup"
        self._tick_ev = asyncio.Event()
        self.nofile = (0, 0)
        self.connect_wall = 0.0
        self.tcp_established: int | None = None
        self.drop_mode: str | None = None
        #: Seconds the server took to start (cold start = this + connecting).
        self.server_start_s = 0.0
        #: Seconds the drop itself took (a restart: drain, exit, start again).
        self.restart_s = 0.0
        #: Live-event latency from the drop until every client recovered.
        self.storm_hist: Any = None
        #: The same from the start of publishing until the drop.
        self.before_hist: Any = None
        #: Clients live when each worker of a rolling restart was stopped.
        self.live_at_moves: list[int] = []
        self._redis: tgt.RedisProcess | None = None
        self.server_stats: dict[str, Any] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.slow_count = sum(1 for w in assign(plan) for c in w if c.role == "slow")

    # --- top level ---------------------------------------------------------------

    async def execute(self) -> dict[str, Any]:
        p = self.plan
        bound = p.connect_timeout + p.duration + 3 * p.drain_timeout + SLOW_RESUME_TIMEOUT + 120
        # The Run owns its ticker: cancelled and awaited before teardown.
        loop = asyncio.get_running_loop()
        ticker = loop.create_task(self._tick_loop(), name="monitor")
        main = asyncio.current_task()
        assert main is not None
        # SIGTERM ends a run like Ctrl-C does (asyncio.Runner cancels on SIGINT):
        # the main task is cancelled and teardown still runs.
        loop.add_signal_handler(signal.SIGTERM, main.cancel)
        try:
            async with asyncio.timeout(bound):
                await self._setup()
                await self._connect_phase()
                if p.publishes:
                    await self._publish_phase()
                else:
                    await self._idle_phase()
                await self._drain_phase()
        except TimeoutError:
            self.aborted = f"the run passed its time bound ({bound:.0f} s)"
        except RuntimeError as e:
            self.aborted = str(e)
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            await self._teardown()
        return self._result()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self._collect()
            row = self.monitor.tick(self.pubstats.sent, self.pubstats.acked, self.phase)
            stats = self.target.server_stats() if self.target is not None else None
            if stats is not None:  # embedded: what the server itself counts
                row["server_slow_consumers"] = stats.get("slow_consumers")
                row["server_connections"] = stats.get("connections")
            p99 = None
            if not self.ui.quiet and len(self.monitor.timeline) % 4 == 0:
                p99 = percentiles(self.monitor.total).get("p99")
            self.ui.update(row, self.plan.clients, p99)
            self._tick_ev.set()

    def _collect(self) -> None:
        for w in self.workers:
            self.monitor.absorb(w.collect())

    async def _until(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            self._tick_ev.clear()
            if pred(self.monitor.counters()):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._tick_ev.wait(), min(left, 2 * TICK))

    # --- setup -------------------------------------------------------------------

    def _make_target(self) -> tgt.Target:
        p, o = self.plan, self.topts
        conf: dict[str, Any] = {}
        if p.max_buffer is not None:
            conf["max_buffer"] = p.max_buffer
        if p.history_size is not None:
            conf["history_size"] = p.history_size
        conf.update(o.server_opts)
        if o.server == "external":
            if not o.url:
                raise tgt.TargetError("give --url (or --server embedded|process)")
            host, port, path = tgt.loopback_host(o.url, "--url")
            t: tgt.Target = tgt.ExternalTarget("external", host, port, path)
            t.secret, t.token, t.api_key = o.secret, o.token, o.api_key
            t.pid = o.server_pid
            if conf:
                self.notes.append(f"server settings {conf} not applied: the server is external")
        else:
            # Room for every subscriber and publisher, whatever the default.
            conf.setdefault("max_connections", p.clients + p.publishers * max(1, p.inflight) + 64)
            if o.server == "embedded":
                t = tgt.EmbeddedTarget("embedded", config={"host": "127.0.0.1", "port": 0, **conf})
            else:
                t = tgt.ProcessTarget(
                    "process", flags=conf, cpus=o.server_cpus, log_path=o.server_log
                )
                if p.cluster:
                    # --workers N over a throwaway Redis (started in _setup),
                    # sharing one fixed port.
                    n = int(conf.get("workers", CLUSTER_WORKERS))
                    t.flags["workers"] = n
                    t.port = tgt.free_port()
                    t.gateways = n
                elif p.scenario in RECOVERY:
                    self._tmp = tempfile.TemporaryDirectory(prefix="guildcast-loadtest-")
                    t.data_dir = self._tmp.name
            t.settings = dict(conf)
            t.want_api = p.via == "http"
        if o.api_url:
            ah, ap, _ = tgt.loopback_host(o.api_url, "--api-url")
            t.api_host, t.api_port = ah, ap
        if o.api_key:
            t.api_key = o.api_key
        return t

    def _preflight(self) -> None:
        p, o = self.plan, self.topts
        self.nofile = tgt.raise_nofile()
        hard = self.nofile[1]
        pubs = p.publishers * (p.inflight if p.via == "http" else 1)
        inline = inline_fleet(p.workers, o)
        need = (p.clients if inline else 0) + pubs + FD_MARGIN
        if o.server == "embedded":
            need += p.clients + pubs
        if need > hard:
            raise tgt.TargetError(
                f"this run needs about {need} open files in the harness process and the hard "
                f"limit is {hard}: use --server process and/or more --workers"
            )
        if not inline and p.clients // p.workers + FD_MARGIN > hard:
            raise tgt.TargetError(f"{p.clients // p.workers} connections per worker > {hard}")

    async def _setup(self) -> None:
        p, o = self.plan, self.topts
        self._preflight()
        if o.client_cpus:
            os.sched_setaffinity(0, o.client_cpus)
        self.target = t = self._make_target()
        if t.mode == "external":
            self.ui.log(f"using the server at {t.url}")
        else:
            self.ui.log(f"starting the server ({t.mode})")
        if self.plan.cluster and isinstance(t, tgt.ProcessTarget):
            self._redis = tgt.RedisProcess()
            await self._redis.start()
            t.flags["redis"] = self._redis.url
        started = time.monotonic()
        await t.start()
        self.server_start_s = time.monotonic() - started
        if t.secret:
            self.sub_token = mint(t.secret, "lt-sub", ["*"], [], None)
            self.pub_token = mint(t.secret, "lt-pub", [], ["*"], 0)
        elif t.token:
            self.sub_token = self.pub_token = t.token
        else:
            raise tgt.TargetError("give --secret (to mint tokens) or --token for this server")
        if p.via == "http" and t.api_port is None:
            raise tgt.TargetError(
                "--via http needs the server's HTTP API: give --api-url, or use a server "
                "with --api-port"
            )
        mon = self.monitor
        if t.mode == "embedded":
            mon.server = ProcSampler(os.getpid())
        elif t.pid is not None:
            mon.server = ProcSampler(t.pid)
        src = ["127.0.0.1"]
        if t.host.startswith("127."):
            src = [f"127.0.0.{k}" for k in range(1, p.source_addrs + 1)]
        per = assign(p)
        inline = inline_fleet(p.workers, o)
        for wid, clients in enumerate(per):
            spec = FleetSpec(
                wid=wid,
                host=t.host,
                port=t.port,
                path=t.path,
                token=self.sub_token,
                # One token per client (its own ``sub``), as real users have:
                # a server that caches verified tokens gains nothing here.
                secret=t.secret,
                clients=clients,
                src_addrs=src,
                connect_concurrency=max(8, p.connect_concurrency // p.workers),
                slow_rcvbuf=p.slow_rcvbuf,
                churn_life=p.churn_life,
                seed=p.seed,
                cpus=worker_cpus(o.client_cpus, wid, p.workers),
                deflate=p.deflate,
            )
            self.workers.append(InlineWorker(spec) if inline else ProcessWorker(spec))
        self.ui.log(f"starting {len(self.workers)} worker(s) ({'inline' if inline else 'spawned'})")
        await asyncio.gather(*(w.start() for w in self.workers))
        role = "controller+fleet" if inline else "controller"
        if t.mode == "embedded":
            role += "+server"
        mon.add_harness(os.getpid(), role)
        workers = self.workers
        mon.delivered_fn = lambda: sum(w.delivered_now() for w in workers)
        mon.pub_fn = lambda: (self.pubstats.sent, self.pubstats.acked)
        for w in self.workers:
            if w.pid is not None and w.pid != os.getpid():
                mon.add_harness(w.pid, f"worker{w.spec.wid}")

    # --- phases ------------------------------------------------------------------

    async def _connect_phase(self) -> None:
        p = self.plan
        self.phase = "connect"
        self.ui.log(f"connecting {p.clients} clients")
        self.monitor.mark("connect")
        self.connect_wall = time.time()
        for w in self.workers:
            w.send({"cmd": "connect"})
        ok = await self._until(
            lambda c: (
                c["ever_live"] >= p.clients or c["ever_live"] + c["connect_failures"] >= p.clients
            ),
            p.connect_timeout,
        )
        self._collect()
        self.monitor.mark("connected")
        if not ok:
            c = self.monitor.counters()
            raise RuntimeError(
                f"only {c['ever_live']}/{p.clients} clients connected within "
                f"{p.connect_timeout:.0f} s (errors: {c['connect_errors']})"
            )
        t = self.target
        if t is not None and t.mode == "process" and self.monitor.server is not None:
            self.tcp_established = await asyncio.to_thread(self.monitor.server.tcp_established)

    def _publishers(self) -> list[GatewayPublisher | HttpPublisher]:
        p, t = self.plan, self.target
        assert t is not None
        gids = p.gids()
        rate = p.rate / p.publishers
        out: list[GatewayPublisher | HttpPublisher] = []
        for k in range(p.publishers):
            load = Load(
                gids,
                rate,
                p.inflight,
                p.size,
                self.pubstats,
                p.seed * 7919 + k,
                p.pad,
                p.publish_tick,
            )
            if p.via == "http":
                assert t.api_port is not None
                out.append(HttpPublisher(t.api_host or t.host, t.api_port, t.api_key, load))
            else:
                out.append(GatewayPublisher(t.host, t.port, t.path, self.pub_token, load))
        if p.max_lag:
            gate = self._gate()
            for pub in out:
                pub.gate = gate
        return out

    def _gate(self) -> Callable[[], int]:
        """Events publishers may still send before being ``max_lag`` ahead of
        the average subscriber (see loadtest/publish.py, flow control)."""
        p = self.plan
        per_event = max(1e-9, (p.clients - self.slow_count) * p.active_per_client / p.guilds)
        workers = self.workers
        stats = self.pubstats

        def gate() -> int:
            delivered = sum(w.delivered_now() for w in workers)
            return int(p.max_lag - (stats.sent - delivered / per_event))

        return gate

    async def _publish_phase(self) -> None:
        p = self.plan
        pubs = self._publishers()
        stop = asyncio.Event()
        if p.slow_fraction:
            self._send_all({"cmd": "slow_pause"})
        if p.churn_fraction:
            self._send_all({"cmd": "churn", "on": True})
        self.phase = "publish"
        self.ui.log(f"publishing for {p.duration:.0f} s at {p.rate or 'max'} events/s via {p.via}")
        self.monitor.mark("publish")
        if p.scenario == "storm":
            self.monitor.window = new_hist()  # live latency before the storm
        async with asyncio.TaskGroup() as tg:
            for k, pub in enumerate(pubs):
                tg.create_task(pub.run(stop), name=f"publisher-{k}")
            dropper = None
            if p.scenario in RECOVERY:
                dropper = tg.create_task(self._drop_later(), name="dropper")
            await asyncio.sleep(p.duration)
            stop.set()
            for pub in pubs:
                pub.wake()
            self.phase = "finish"
            if dropper is not None:
                await dropper
        self.monitor.mark("publish_end")
        if p.churn_fraction:
            self._send_all({"cmd": "churn", "on": False})

    async def _drop_later(self) -> None:
        p, t = self.plan, self.target
        assert t is not None
        await asyncio.sleep(p.duration * p.reconnect_at)
        mode = p.reconnect_mode
        if mode == "auto":
            mode = t.drop_modes[0]
        elif mode == "disconnect":
            mode = "disconnect_all"
        if mode not in t.drop_modes:
            raise RuntimeError(
                f"--reconnect-mode {p.reconnect_mode}: this {t.mode} server allows "
                f"{', '.join(t.drop_modes)}"
            )
        self.drop_mode = mode
        self.monitor.mark("drop")
        self.before_hist = self.monitor.window
        self.monitor.window = new_hist()  # live-event latency during the storm
        before = self.monitor.counters()["reconnects"]
        self.ui.log(f"dropping every session ({mode})")
        n = p.clients
        # Clients that must come back before the storm is over: all of them,
        # but one worker's share when one worker of several is killed.
        need = n
        restarting = time.monotonic()
        if mode == "disconnect_all":
            t.disconnect_all(4000)
        elif mode in ("restart", "kill"):
            assert isinstance(t, tgt.ProcessTarget)
            await (t.restart() if mode == "restart" else t.kill_restart())
            if self.monitor.server is not None and t.pid is not None:
                self.monitor.server.switch(t.pid)
        elif mode in ("rolling", "kill-worker"):
            assert isinstance(t, tgt.ProcessTarget)

            async def settled() -> None:
                # Every client back (the moved ones recovered on the others)
                # before the next worker drains; bounded, and a run that
                # never settles goes on and fails its checks.
                await self._until(lambda c: c["live"] >= n, p.drain_timeout)
                self.live_at_moves.append(self.monitor.counters()["live"])

            try:
                stopped = await t.rolling_restart(kill=mode == "kill-worker", settled=settled)
            except TimeoutError:
                # A worker that never came back: say so (with what the
                # server printed last) and let the checks fail, no crash.
                self.notes.append(
                    "rolling restart: a worker was not listening again within 60 s; the "
                    "server's last lines: " + " | ".join(list(t.output)[-20:])
                )
                stopped = 0
            need = 1 if stopped < t.gateways else n
        else:
            self._send_all({"cmd": "drop"})
        self.restart_s = time.monotonic() - restarting
        ok = await self._until(
            lambda c: c["reconnects"] - before >= need and c["live"] >= n, p.drain_timeout
        )
        self.monitor.mark("recovered" if ok else "recovery_timeout")
        self.storm_hist, self.monitor.window = self.monitor.window, None

    async def _idle_phase(self) -> None:
        p, t = self.plan, self.target
        assert t is not None
        self.phase = "idle"
        self.ui.log(f"holding {p.clients} idle connections for {p.duration:.0f} s")
        self.monitor.mark("publish")
        await asyncio.sleep(p.duration)
        self.monitor.mark("idle_end")
        # One probe event per guild: every idle connection must still deliver.
        self.phase = "probe"
        load = Load(p.gids(), 0, 64, p.size, self.pubstats, p.seed, p.pad)
        pub = GatewayPublisher(t.host, t.port, t.path, self.pub_token, load)
        if not await pub.open():
            raise RuntimeError("the probe publisher could not connect")
        for gid in p.gids():
            pub.gids, pub.gids_b = [gid], [gid.encode()]
            while len(pub.inflight) >= pub.window:
                pub.room.clear()
                await asyncio.wait_for(pub.room.wait(), 10)
            pub._send(1)
        await pub.finish()
        self.monitor.mark("publish_end")

    async def _drain_phase(self) -> None:
        p = self.plan
        self.phase = "drain"
        want = p.clients - self.slow_count
        ok = await self._until(lambda c: c["live"] - c["slow_live"] >= want, p.drain_timeout)
        if not ok:
            self.notes.append("not every non-slow client was connected at the end of the run")
        heads = dict(self.pubstats.heads)
        self._send_all({"cmd": "expect", "heads": heads})
        self.ui.log(
            f"draining: every subscriber must reach the last acknowledged s ({len(heads)} guilds)"
        )
        await self._until(lambda c: c["lagging"] == 0, p.drain_timeout)
        self._collect()
        self.monitor.mark("drained")
        if self.slow_count:
            self.phase = "slow-resume"
            self._send_all({"cmd": "slow_resume"})
            await self._until(lambda c: c["slow_live"] == 0, SLOW_RESUME_TIMEOUT)
            self._collect()
            self.monitor.mark("slow_resumed")
        self.phase = "done"

    def _send_all(self, cmd: dict[str, Any]) -> None:
        for w in self.workers:
            w.send(cmd)

    # --- teardown ----------------------------------------------------------------

    async def _teardown(self) -> None:
        self.ui.close()
        for w in self.workers:
            try:
                final = await w.close()
                self.monitor.absorb(w.collect() if isinstance(w, ProcessWorker) else [])
                self.monitor.absorb([final])
                self.finals.append(final)
            except Exception as e:
                self.notes.append(f"worker {w.spec.wid}: {e}")
                if isinstance(w, ProcessWorker):
                    await w.kill()
        t = self.target
        if t is not None:
            with contextlib.suppress(Exception):
                self.server_stats = t.server_stats()
            await t.stop()
        if self._redis is not None:
            await self._redis.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    # --- result ------------------------------------------------------------------

    def _storm(self, final: dict[str, Any], connect_s: float) -> dict[str, Any]:
        """The storm's figures: recovery against a cold start of the same
        clients on the same server (its start plus connecting them all)."""
        mon = self.monitor
        m_drop, m_rec = mon.get_mark("drop"), mon.get_mark("recovered")
        m_conned = mon.get_mark("connected")
        # Recovered: when the last worker had every client live again, by
        # the workers' own clock (as a cold start's ``all_live_at``), not
        # when the controller next read their reports (up to a report
        # interval and a tick later); the mark's time is kept beside it.
        rec_mark_s = round(m_rec.t - m_drop.t, 3) if m_drop and m_rec else None
        full = m_rec.counters.get("full_at") if m_rec else None
        rec_s = rec_mark_s
        if m_drop and m_rec and full is not None and m_drop.t < full <= m_rec.t:
            rec_s = round(full - m_drop.t, 3)
        # When the harness had seen the last of the dropped connections end.
        ended = m_rec.counters.get("ended_at") if m_rec else None
        noticed = round(ended - m_drop.t, 3) if m_drop and ended and ended > m_drop.t else None
        cold = round(self.server_start_s + connect_s, 3)
        during = percentiles(self.storm_hist) if self.storm_hist is not None else {}
        failures_before = m_conned.counters["connect_failures"] if m_conned else 0
        return {
            "mode": self.drop_mode,
            "server_start_seconds": round(self.server_start_s, 3),
            "restart_seconds": round(self.restart_s, 3),
            "noticed_seconds": noticed,
            "connect_seconds": round(connect_s, 3),
            "cold_seconds": cold,
            "recovery_seconds": rec_s,
            "recovery_mark_seconds": rec_mark_s,
            "recovery_over_cold": round(rec_s / cold, 2) if rec_s and cold else None,
            # Gaps, including the events an unrecovered subscription missed.
            "lost": final["gap_events"],
            "unrecovered": final["unrecovered"],
            "doubled": final["dups"],
            "gave_up": final["connect_failures"] - failures_before,
            "recovered": final["recovered"],
            "replayed": final["replayed"],
            "hinted_waits": final["hinted_waits"],
            "refused_waits": final["refused_waits"],
            "live_at_moves": self.live_at_moves,
            "refused_1013": final["closes"].get("1013", 0),
            "live_latency_during_us": during,
            "live_latency_before_us": percentiles(self.before_hist)
            if self.before_hist is not None
            else {},
            "rss_peak": mon.server_peak_rss or None,
        }

    def _result(self) -> dict[str, Any]:
        p, mon, t = self.plan, self.monitor, self.target
        final = mon.counters()
        m_conn, m_conned = mon.get_mark("connect"), mon.get_mark("connected")
        m_pub, m_drained = mon.get_mark("publish"), mon.get_mark("drained")
        m_pub_end = mon.get_mark("publish_end")
        m_drop, m_rec = mon.get_mark("drop"), mon.get_mark("recovered")
        connected = m_conned.counters["ever_live"] if m_conned else 0
        all_live_at = m_conned.counters.get("all_live_at") if m_conned else None
        if all_live_at and self.connect_wall:
            conn_s = max(1e-6, all_live_at - self.connect_wall)
        elif m_conn and m_conned:
            conn_s = m_conned.t - m_conn.t
        else:
            conn_s = 0.0
        conn_busy: dict[str, float | None] = {"server": None, "harness": None}
        if m_conn and m_conned and m_conned.t > m_conn.t:
            span = m_conned.t - m_conn.t
            sa, sb = m_conn.server, m_conned.server
            if sa and sb and not (t is None or t.mode == "embedded"):
                used = sum(sb[k] - sa[k] for k in ("user", "system", "wait"))
                conn_busy["server"] = round(100 * used / span, 1)
            hb = [
                100 * ((m_conned.harness[k][0] + m_conned.harness[k][1]) - (v[0] + v[1])) / span
                for k, v in m_conn.harness.items()
                if k in m_conned.harness
            ]
            conn_busy["harness"] = round(max(hb), 1) if hb else None
        rss_per_conn = None
        if m_conn and m_conned and m_conn.server and m_conned.server and connected:
            rss_per_conn = (m_conned.server["rss"] - m_conn.server["rss"]) / connected

        window = _window(m_pub, m_drained)
        delivered_w = _delta(m_pub, m_drained, "delivered")
        acked_w = _delta(m_pub, m_drained, "pub_acked")
        srv_cpu = None
        if m_pub and m_drained and m_pub.server and m_drained.server:
            srv_cpu = (m_drained.server["user"] + m_drained.server["system"]) - (
                m_pub.server["user"] + m_pub.server["system"]
            )
        pub_rows = [r for r in mon.timeline if r["phase"] == "publish"]
        steady = pub_rows[1:-1] or pub_rows
        shared = t is None or t.mode == "embedded"
        harness: list[dict[str, Any]] = []
        if m_pub and m_drained and window:
            for pid, role in mon.harness_roles.items():
                a, b = m_pub.harness.get(pid), m_drained.harness.get(pid)
                if a is not None and b is not None:
                    harness.append(
                        {
                            "pid": pid,
                            "role": role,
                            "cpu_percent": round(100 * (b[0] - a[0]) / window, 1),
                            "wait_percent": round(100 * (b[1] - a[1]) / window, 1),
                        }
                    )
        for h in harness:
            h["busy_percent"] = round(h["cpu_percent"] + h["wait_percent"], 1)
        saturated = any(float(h["busy_percent"]) > SATURATED_PCT for h in harness)
        srv_wait = srv_busy = None
        if m_pub and m_drained and m_pub.server and m_drained.server and window:
            srv_wait = round(100 * (m_drained.server["wait"] - m_pub.server["wait"]) / window, 1)
            if srv_cpu is not None:
                srv_busy = round(100 * srv_cpu / window + srv_wait, 1)
        waits = [h["wait_percent"] for h in harness] + ([srv_wait] if srv_wait else [])
        contended = any(w > CONTENDED_PCT for w in waits)
        server_saturated = not shared and srv_busy is not None and srv_busy > SATURATED_PCT
        limit = limit_of(saturated, server_saturated, shared)
        rss_start = m_pub.server["rss"] if m_pub and m_pub.server else None
        rss_end = m_drained.server["rss"] if m_drained and m_drained.server else None
        lat = percentiles(mon.total, mean=True)
        pub_s = _window(m_pub, m_pub_end) if m_pub_end else window
        result: dict[str, Any] = {
            "scenario": p.scenario,
            "ok": False,
            "date": self.date,
            "command": self.command,
            "aborted": self.aborted,
            "machine": {
                "cpus": os.cpu_count(),
                "affinity_harness": sorted(os.sched_getaffinity(0)),
                "kernel": platform.release(),
                "python": platform.python_version(),
                "host": socket.gethostname(),
                "nofile": list(self.nofile),
                "load_avg": list(os.getloadavg()),
            },
            "params": p.to_json(),
            "server": {
                "mode": t.mode if t else None,
                "pid": t.pid if t else None,
                "url": t.url if t else None,
                "cpus": self.topts.server_cpus,
                "settings": t.settings if t else {},
                "shared_with_harness": shared,
                "measured": mon.server is not None,
                "stats": self.server_stats,
            },
            "connect": {
                "connected": connected,
                "seconds": round(conn_s, 3),
                "per_s": round(connected / conn_s, 1) if conn_s else 0.0,
                # 0.0 is a measurement (RSS did not grow: an embedded server
                # reusing freed memory), not "unknown".
                "rss_per_connection": None if rss_per_conn is None else round(rss_per_conn, 1),
                "server_tcp_established": self.tcp_established,
                # Runnable share (CPU + waiting for one) while connecting.
                "server_busy_percent": conn_busy["server"],
                "harness_busy_percent": conn_busy["harness"],
                "failures": m_conned.counters["connect_failures"] if m_conned else None,
                "errors": m_conned.counters["connect_errors"] if m_conned else None,
            },
            "publish": {
                "via": p.via,
                "rate_target": p.rate,
                "seconds": round(pub_s, 3),
                "per_s": round(_delta(m_pub, m_pub_end, "pub_acked") / p.duration, 1),
                "ack_latency_us": percentiles(ack_hist(self.pubstats)),
                **self.pubstats.snapshot(),
            },
            "delivery": {
                "delivered": final["delivered"],
                "window_seconds": round(window, 3),
                "per_s": round(delivered_w / window, 1) if window else 0.0,
                "per_s_peak": max((r["delivered_per_s"] for r in pub_rows), default=0.0),
                "per_s_median": statistics.median([r["delivered_per_s"] for r in steady])
                if steady
                else 0.0,
                "gaps": final["gaps"],
                "gap_events": final["gap_events"],
                "dups": final["dups"],
                "unexpected": final["unexpected"],
                "lagging": m_drained.counters["lagging"] if m_drained else None,
                "recovered": final["recovered"],
                "unrecovered": final["unrecovered"],
                # Every byte the subscribers received (handshakes included),
                # and with --deflate the compressed payloads and what they
                # inflated to: the wire-size ratio is inflated_in / inflated_out.
                "wire_bytes": final["wire_bytes"],
                "inflated_in": final["inflated_in"],
                "inflated_out": final["inflated_out"],
                # Passive subscriptions' GUILD_ACTIVITY notices (all run).
                "notices": final["notices"],
                # Bytes the clients read in the window, per client (frames
                # of events, notices, heartbeat answers).
                "bytes_per_client": round(_delta(m_pub, m_drained, "bytes_in") / p.clients, 1)
                if m_pub and m_drained
                else None,
            },
            "latency_us": lat,
            "server_usage": {
                "cpu_seconds": round(srv_cpu, 3) if srv_cpu is not None else None,
                "cpu_percent": round(100 * srv_cpu / window, 1) if srv_cpu and window else None,
                # Only where deliveries are the work (connect idles; a restart
                # adds a start-up).
                "cpu_per_delivery_us": round(srv_cpu / delivered_w * 1e6, 3)
                if srv_cpu and delivered_w and p.publishes and self.drop_mode != "restart"
                else None,
                # Per event published and acknowledged in the window: what
                # one event costs, whoever receives it (the passive scenario).
                "cpu_per_event_us": round(srv_cpu / acked_w * 1e6, 3)
                if srv_cpu and acked_w and p.publishes and self.drop_mode != "restart"
                else None,
                "wait_percent": srv_wait,
                "busy_percent": srv_busy,
                "saturated": server_saturated,
                "rss_start": rss_start,
                "rss_peak": mon.server_peak_rss or None,
                "rss_end": rss_end,
                "fds_peak": mon.server_peak_fds or None,
            },
            "harness": {"processes": harness, "saturated": saturated, "contended": contended},
            #: What set the pace: "harness", "server", "both" or "neither".
            "limit": limit,
            "clients": {
                "closes": final["closes"],
                "errors": final["errors"],
                "error_samples": final["error_samples"],
                "reconnects": final["reconnects"],
                "reconnect_requests": final["reconnect_requests"],
                "protocol_errors": final["protocol_errors"],
                "lat_clamped": final["lat_clamped"],
            },
            "slow": {
                "clients": self.slow_count,
                "closed": final["slow_closed"],
                "still_live": final["slow_live"] if self.slow_count else 0,
            },
            "churn": {"leaves": final["churn_leaves"], "resubscribes": final["churn_resubscribes"]},
            "reconnect": {
                "mode": self.drop_mode,
                # From the drop until every client was subscribed again.
                "recovery_seconds": round(m_rec.t - m_drop.t, 3) if m_drop and m_rec else None,
                "connect_errors_after_connect": {
                    k: v - (m_conned.counters["connect_errors"].get(k, 0) if m_conned else 0)
                    for k, v in final["connect_errors"].items()
                },
            },
            "storm": self._storm(final, connect_s=conn_s) if p.scenario == "storm" else None,
            "marks": [{"name": m.name, "t": round(m.t - mon.started, 3)} for m in mon.marks],
            "timeline": mon.timeline,
            "notes": self.notes,
        }
        if shared:
            result["notes"].append(
                "embedded server: server and harness share one process, so the server's CPU "
                "and RSS include the harness; use --server process for real numbers"
            )
        if contended:
            result["notes"].append(
                "contended: a measured process waited more than "
                f"{CONTENDED_PCT:.0f}% of the time for a CPU (other load on the machine); "
                "its figures are lower than an idle machine would give"
            )
        if saturated:
            result["notes"].append(
                "harness-saturated: a harness process was runnable (on a CPU or waiting for "
                f"one) more than {SATURATED_PCT:.0f}% of the time; the figures are the "
                "harness's limit, not necessarily the server's"
            )
        result["checks"] = checks(p, result, final, self.aborted, self.slow_count)
        if result["storm"] is not None:
            result["checks"].extend(storm_checks(result["storm"]))
        result["ok"] = all(c["ok"] for c in result["checks"])
        return result


def storm_checks(st: dict[str, Any]) -> list[dict[str, Any]]:
    """The storm's own invariants (issue "reconnect storms"): nothing lost,
    nothing doubled, nobody gave up, and a restart of one node recovered
    within ``STORM_RATIO`` x a cold start of the same clients."""
    out = [
        {"name": "storm: nothing lost", "ok": st["lost"] == 0, "detail": f"{st['lost']}"},
        {"name": "storm: nothing doubled", "ok": st["doubled"] == 0, "detail": f"{st['doubled']}"},
        {"name": "storm: nobody gave up", "ok": st["gave_up"] == 0, "detail": f"{st['gave_up']}"},
        {
            "name": "storm: every client recovered",
            "ok": st["recovery_seconds"] is not None,
            "detail": f"in {st['recovery_seconds']} s",
        },
    ]
    if st["mode"] in ("restart", "kill") and st["recovery_seconds"] is not None:
        ratio = st["recovery_over_cold"]
        out.append(
            {
                "name": f"storm: recovered within {STORM_RATIO:g}x a cold start",
                "ok": ratio is not None and ratio <= STORM_RATIO,
                "detail": f"{st['recovery_seconds']} s vs cold {st['cold_seconds']} s ({ratio}x)",
            }
        )
    return out


def limit_of(harness_saturated: bool, server_saturated: bool, shared: bool) -> str:
    """What set the pace of a run: "harness", "server", "both" or neither."""
    if harness_saturated and server_saturated:
        return "both"
    if harness_saturated:
        return "harness"
    if server_saturated:
        return "server"
    if shared:
        return "unknown (embedded: one process)"
    return "neither (the load was below both)"


def checks(
    p: Plan, r: dict[str, Any], final: dict[str, Any], aborted: str | None, slow_count: int
) -> list[dict[str, Any]]:
    """The scenario's invariants over a result ``r`` (the ``--json`` dict
    without ``checks``) and the final merged counters: pure arithmetic."""
    out: list[dict[str, Any]] = []

    def check(name: str, ok: bool, detail: str) -> None:
        out.append({"name": name, "ok": bool(ok), "detail": detail})

    d = r["delivery"]
    check("run completed", aborted is None, aborted or "every phase finished")
    check(
        "all clients connected",
        r["connect"]["connected"] == p.clients,
        f"{r['connect']['connected']}/{p.clients}",
    )
    check("no gaps", d["gaps"] == 0 and d["gap_events"] == 0, f"{d['gap_events']} missing")
    check("no duplicates", d["dups"] == 0, f"{d['dups']}")
    check("no unexpected events", d["unexpected"] == 0, f"{d['unexpected']}")
    check(
        "no protocol errors",
        final["protocol_errors"] == 0 and not final["errors"],
        f"{final['protocol_errors']} protocol, ERROR frames {final['errors']}",
    )
    check(
        "every subscriber reached the last acknowledged s",
        d["lagging"] == 0,
        f"{d['lagging']} (client, guild) pairs behind",
    )
    pub = r["publish"]
    check("events were acknowledged", pub["acked"] > 0, f"{pub['acked']} acked")
    bad_pub = {
        k: v
        for k, v in pub["errors"].items()
        if not (p.scenario in RECOVERY and k.split(":")[0] in ("close", "connect"))
    }
    check("no publish refused", not bad_pub, str(bad_pub or "none"))
    if p.publishes:
        check(
            "latency recorded",
            r["latency_us"].get("count", 0) > 0,
            f"{r['latency_us'].get('count', 0)} samples",
        )
    if p.scenario in RECOVERY:
        # One worker of several killed: only its share comes back.
        whole = r["reconnect"]["mode"] != "kill-worker"
        check(
            "every client reconnected",
            final["reconnects"] >= (p.clients if whole else 1),
            f"{final['reconnects']} reconnects for {p.clients} clients",
        )
        check(
            "every subscription recovered",
            final["recovered"] >= (p.clients if whole else 1) and final["unrecovered"] == 0,
            f"{final['recovered']} recovered, {final['unrecovered']} not",
        )
    if p.scenario == "churn":
        check(
            "clients churned",
            final["churn_leaves"] > 0 and final["churn_resubscribes"] > 0,
            f"{final['churn_leaves']} left and came back, "
            f"{final['churn_resubscribes']} resubscribed",
        )
    if slow_count:
        closed = sum(r["slow"]["closed"].values())
        check(
            "slow consumers were closed",
            closed == slow_count,
            f"{closed}/{slow_count} closed {r['slow']['closed']}",
        )
        fast_closed = sum(final["closes"].values()) - closed
        check("no other client was closed", fast_closed == 0, f"{fast_closed}")
        su = r["server_usage"]
        mb = r["server"]["settings"].get("max_buffer") or p.max_buffer or 4 * 1024 * 1024
        bound = slow_count * mb + RSS_SLACK
        if su["rss_peak"] and su["rss_start"]:
            growth = su["rss_peak"] - su["rss_start"]
            check(
                "server memory bounded",
                growth <= bound,
                f"grew {growth / 1048576:.1f} MiB <= {bound / 1048576:.1f} MiB "
                f"(slow x max_buffer + {RSS_SLACK >> 20} MiB)",
            )
    return out


def _window(a: Mark | None, b: Mark | None) -> float:
    return (b.t - a.t) if a and b else 0.0


def _delta(a: Mark | None, b: Mark | None, key: str) -> int:
    if not a or not b:
        return 0
    return int(b.counters.get(key, 0)) - int(a.counters.get(key, 0))
