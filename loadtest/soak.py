"""The soak: a long ``churn`` run against a server process, sampled for leaks.

    guildcast loadtest soak --duration 1800 --json soak.json

Owns one server process (a :class:`~guildcast.loadtest.target.ProcessTarget`:
``guildcast serve`` with durable history in a temporary ``--data-dir`` and its
HTTP API with open ``/metrics``), one load-test harness process running the
``churn`` scenario against it (``guildcast loadtest churn --url ...
--server-pid ...``), and a sampler (:class:`~guildcast.loadtest.monitor.ProcSampler`) that
every ``--interval`` seconds records the server's RSS, open file
descriptors, threads and CPU (psutil) and its ``/metrics`` gauges (guild
actors alive and started, connections, sessions, mailbox depths). Besides
the churn, it publishes one event to ``--transient`` brand-new guilds per
sample over the HTTP API, so guild actors keep starting and, after the
server's ``--idle-timeout``, stopping: a registry, journal or mailbox leak
shows as growth.

At the end it reports, for the samples after ``--warmup``: the RSS slope
(least squares, MiB per hour) and its range, file descriptors (range and
slope), guild actors alive (range) and the harness's own verdict (gaps and
duplicates for clients that stayed and that came back, every check). It
exits 0 when the harness's checks held, nothing grew past the bounds given
(``--max-rss-slope``, ``--max-fd-growth``, guild actors bounded by what the
idle timeout allows) and the server survived; 1 otherwise.

Bounds: one sample per interval, at most ``duration / interval + 1`` kept;
every process it starts is stopped on exit (SIGTERM, then SIGKILL after
``target.STOP_TIMEOUT``); both also die with this process
(``PR_SET_PDEATHSIG``); runs are bounded by ``--duration`` (at most
``MAX_DURATION``). Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from guildcast.loadtest.monitor import ProcSampler
from guildcast.loadtest.target import ProcessTarget, TargetError, die_with_parent, stop_process

PROG = "guildcast loadtest soak"
#: Longest soak accepted (seconds): the harness's own bound.
MAX_DURATION = 3600.0
#: Seconds the harness may take beyond the run's duration (connect, drain,
#: report); past it the soak is stopped as failed.
HARNESS_SLACK = 300.0
#: Seconds a ``/metrics`` scrape or a transient publish may take.
HTTP_TIMEOUT = 10.0
#: Events per prefill request: the API's largest batch (``api_max_batch``).
PREFILL_BATCH = 1000
#: Gauges read from ``/metrics`` (name without the ``guildcast_`` prefix).
GAUGES = (
    "guild_actors",
    "guild_actors_started",
    "connections",
    "connections_pending",
    "sessions_identified",
    "subscriptions",
    "events_published",
    "slow_consumers",
)
_METRIC_LINE = re.compile(r"^guildcast_([a-z_]+?)(?:_total)?(\{[^}]*\})?\s+([0-9.eE+-]+|NaN)$")


@dataclass
class Sample:
    t: float
    rss: int
    fds: int
    threads: int
    cpu_s: float
    metrics: dict[str, float]
    mailbox_guild: float
    mailbox_partition: float


def parse_metrics(text: str) -> tuple[dict[str, float], dict[str, float]]:
    """``(gauges, guild/partition mailbox totals)`` from Prometheus text."""
    out: dict[str, float] = {}
    mailbox: dict[str, float] = {}
    for line in text.splitlines():
        m = _METRIC_LINE.match(line)
        if m is None:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        if name == "mailbox_messages":
            kind = re.search(r'actor="([a-z]+)"', labels)
            if kind:
                mailbox[kind.group(1)] = value
        elif name in GAUGES and not labels:
            out[name] = value
    return out, mailbox


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(t seconds, value)`` in value per hour (0 if < 2 points)."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    if den == 0:
        return 0.0
    num = sum((t - mt) * (v - mv) for t, v in points)
    return num / den * 3600.0


class Soak:
    def __init__(self, args: argparse.Namespace, data_dir: str) -> None:
        self.args = args
        self.server = ProcessTarget(
            "process",
            flags={
                "metrics_open": True,
                "api_publish_rate": 0,
                "idle_timeout": args.idle_timeout,
                "history_ttl": args.history_ttl,
                "log_level": "WARNING",
            },
            data_dir=None if args.memory else data_dir,
            log_path=args.server_log,
            want_api=True,
        )
        self.harness: asyncio.subprocess.Process | None = None
        self.samples: list[Sample] = []
        self.transient_sent = 0
        self.transient_failed = 0
        self.scrape_failures = 0
        self.t0 = 0.0

    # --- processes ------------------------------------------------------------

    async def start_harness(self) -> None:
        a, srv = self.args, self.server
        argv = [sys.executable, "-P", "-m", "guildcast.loadtest", "churn", "--url", srv.url]
        argv += [f"--secret={srv.secret}", "--server-pid", str(srv.pid)]
        argv += ["--duration", str(a.duration), "--clients", str(a.clients)]
        argv += ["--guilds", str(a.guilds), "--rate", str(a.rate)]
        argv += ["--json", a.harness_json, "--quiet"]
        self.harness = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, preexec_fn=die_with_parent
        )

    # --- sampling ---------------------------------------------------------------

    async def sample(self, http: aiohttp.ClientSession, ps: ProcSampler) -> bool:
        """One sample; False if the server process is gone."""
        metrics: dict[str, float] = {}
        mailbox: dict[str, float] = {}
        try:
            async with http.get(self.server.api_url + "/metrics") as r:
                metrics, mailbox = parse_metrics(await r.text())
        except (aiohttp.ClientError, TimeoutError):
            self.scrape_failures += 1
        x = ps.sample()
        if x is None:
            return False
        self.samples.append(
            Sample(
                t=round(time.monotonic() - self.t0, 2),
                rss=int(x["rss"]),
                fds=int(x["fds"]),
                threads=int(x["threads"]),
                cpu_s=round(x["user"] + x["system"], 2),
                metrics=metrics,
                mailbox_guild=mailbox.get("guild", 0.0),
                mailbox_partition=mailbox.get("partition", 0.0),
            )
        )
        return True

    async def prefill(self, http: aiohttp.ClientSession) -> None:
        """``--prefill`` brand-new guilds, one event each, in batches of the
        API's largest (1,000): fills every per-guild cache the server bounds
        (a durable node keeps up to 10,000 guild logs) before the slopes are
        measured, so a full cache is not mistaken for a leak, or a leak for
        a cache filling up."""
        left = self.args.prefill
        while left > 0:
            n = min(PREFILL_BATCH, left)
            await self.transient(http, n)
            left -= n

    async def transient(self, http: aiohttp.ClientSession, n: int | None = None) -> None:
        """One event to each of ``n`` (``--transient``) guilds never used before."""
        n = self.args.transient if n is None else n
        if n <= 0:
            return
        base = self.transient_sent
        events = [
            {"guild": f"soak-t-{base + i}", "t": "SOAK", "d": {"i": base + i}} for i in range(n)
        ]
        try:
            async with http.post(
                self.server.api_url + "/v1/publish",
                json={"events": events},
                headers={"Authorization": f"Bearer {self.server.api_key}"},
            ) as r:
                await r.read()
                if r.status != 200:
                    self.transient_failed += n
        except (aiohttp.ClientError, TimeoutError):
            self.transient_failed += n
        self.transient_sent += n

    async def run(self) -> dict[str, Any]:
        a, srv = self.args, self.server
        await srv.start()
        assert srv.pid is not None
        ps = ProcSampler(srv.pid)
        self.t0 = time.monotonic()
        await self.start_harness()
        assert self.harness is not None
        deadline = self.t0 + a.duration + HARNESS_SLACK
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT)
        server_died = False
        async with aiohttp.ClientSession(timeout=timeout) as http:
            await self.prefill(http)
            next_at = time.monotonic()
            while True:
                if srv.returncode is not None:
                    server_died = True
                    break
                if self.harness.returncode is not None:
                    break
                if time.monotonic() > deadline:
                    break
                if not await self.sample(http, ps):
                    server_died = True
                    break
                if time.monotonic() - self.t0 < a.duration:
                    await self.transient(http)
                if not a.quiet:
                    s = self.samples[-1]
                    print(
                        f"soak t={s.t:7.0f}s rss={s.rss / 2**20:7.1f} MiB fds={s.fds:5d} "
                        f"guilds={s.metrics.get('guild_actors', -1):6.0f} "
                        f"conns={s.metrics.get('connections', -1):5.0f}",
                        flush=True,
                    )
                next_at += a.interval
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, next_at - time.monotonic())):
                        await self.harness.wait()
        harness_rc = await stop_process(self.harness)
        await srv.stop()
        return self.report(harness_rc, srv.returncode, server_died)

    # --- report -------------------------------------------------------------------

    def report(self, harness_rc: int | None, server_rc: int | None, died: bool) -> dict[str, Any]:
        a = self.args
        after = [s for s in self.samples if s.t >= a.warmup] or self.samples
        rss = [(s.t, float(s.rss)) for s in after]
        fds = [(s.t, float(s.fds)) for s in after]
        # Descriptors beyond the sockets of live connections (which come and
        # go with the churn): listeners, journals, epoll, pipes. A leak shows here.
        other = [
            (s.t, s.fds - s.metrics["connections"] - s.metrics.get("connections_pending", 0.0))
            for s in after
            if "connections" in s.metrics
        ]
        guilds = [s.metrics["guild_actors"] for s in after if "guild_actors" in s.metrics]
        harness: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            harness = json.loads(Path(a.harness_json).read_text())
        delivery = harness.get("delivery", {})
        checks = harness.get("checks", [])
        mib = 2**20
        rss_slope = slope_per_hour(rss) / mib
        fd_growth = (max(v for _, v in other) - min(v for _, v in other)) if other else 0.0
        # Guild actors a correct server can have alive: the churn guilds plus
        # every transient guild of the last idle_timeout (+ two sample periods
        # of slack for the sweep and the scrape).
        window = a.idle_timeout + 2 * a.interval
        guild_bound = a.guilds + a.transient * (window / a.interval + 1)
        if a.warmup < a.idle_timeout + a.interval:
            guild_bound += a.prefill  # the prefilled guilds may still be alive
        verdict = {
            "server_survived": not died and server_rc == 0,
            "harness_checks_ok": bool(harness.get("ok")) and harness_rc == 0,
            "rss_slope_ok": rss_slope <= a.max_rss_slope,
            "fd_growth_ok": fd_growth <= a.max_fd_growth,
            "no_server_errors": not _error_lines(a.server_log),
            "guild_actors_bounded": bool(guilds) and max(guilds) <= guild_bound,
        }
        return {
            "command": " ".join([PROG, *a.argv]),
            "params": {k: v for k, v in vars(a).items() if k != "argv"},
            "duration_run_s": self.samples[-1].t if self.samples else 0.0,
            "ok": all(verdict.values()),
            "verdict": verdict,
            "rss_mib": {
                "first": round(self.samples[0].rss / mib, 1) if self.samples else None,
                "after_warmup_first": round(after[0].rss / mib, 1) if after else None,
                "after_warmup_min": round(min(v for _, v in rss) / mib, 1) if rss else None,
                "after_warmup_max": round(max(v for _, v in rss) / mib, 1) if rss else None,
                "last": round(after[-1].rss / mib, 1) if after else None,
                "slope_mib_per_hour": round(rss_slope, 2),
            },
            "fds": {
                "after_warmup_min": min(v for _, v in fds) if fds else None,
                "after_warmup_max": max(v for _, v in fds) if fds else None,
                "last": after[-1].fds if after else None,
                "slope_per_hour": round(slope_per_hour(fds), 1),
                "beyond_connections_min": min(v for _, v in other) if other else None,
                "beyond_connections_max": max(v for _, v in other) if other else None,
                "beyond_connections_slope_per_hour": round(slope_per_hour(other), 1),
            },
            "guild_actors": {
                "after_warmup_min": min(guilds) if guilds else None,
                "after_warmup_max": max(guilds) if guilds else None,
                "last": guilds[-1] if guilds else None,
                "bound": guild_bound,
                "started": after[-1].metrics.get("guild_actors_started") if after else None,
            },
            "transient": {"guilds": self.transient_sent, "failed": self.transient_failed},
            "scrape_failures": self.scrape_failures,
            "harness": {
                "rc": harness_rc,
                "ok": harness.get("ok"),
                "delivered": delivery.get("delivered"),
                "gaps": delivery.get("gaps"),
                "gap_events": delivery.get("gap_events"),
                "dups": delivery.get("dups"),
                "churn": harness.get("churn"),
                "latency_us": harness.get("latency_us"),
                "failed_checks": [c for c in checks if not c.get("ok")],
                "notes": harness.get("notes"),
            },
            "server": {
                "rc": server_rc,
                "died_during_run": died,
                "log": a.server_log,
                "log_errors": _error_lines(a.server_log),
            },
            "samples": [asdict(s) for s in self.samples],
        }


def _error_lines(path: str) -> list[str]:
    """The server log's ERROR and CRITICAL lines and tracebacks (first 20)."""
    out: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path(path).read_text(errors="replace").splitlines():
            if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback"):
                out.append(line[:300])
                if len(out) >= 20:
                    break
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=1800.0, help="seconds of churn (1800)")
    ap.add_argument("--warmup", type=float, default=300.0, help="seconds left out of slopes (300)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples (5)")
    ap.add_argument("--clients", type=int, default=1000, help="harness clients (1000)")
    ap.add_argument("--guilds", type=int, default=10, help="churn guilds (10)")
    ap.add_argument("--rate", type=float, default=40.0, help="churn events/s, all guilds (40)")
    ap.add_argument(
        "--transient", type=int, default=20, help="new guilds published to per sample (20)"
    )
    ap.add_argument(
        "--idle-timeout", type=float, default=30.0, help="server idle_timeout, seconds (30)"
    )
    ap.add_argument(
        "--max-rss-slope", type=float, default=8.0, help="failing RSS slope, MiB/hour (8)"
    )
    ap.add_argument(
        "--max-fd-growth",
        type=float,
        default=200.0,
        help="failing range of fds beyond connections after warm-up (200)",
    )
    ap.add_argument(
        "--prefill",
        type=int,
        default=12_000,
        help="new guilds published to at the start, to fill bounded caches (12000)",
    )
    ap.add_argument(
        "--history-ttl", type=float, default=300.0, help="server history_ttl, seconds (300)"
    )
    ap.add_argument("--memory", action="store_true", help="no --data-dir: in-memory history")
    ap.add_argument("--data-dir", help="server --data-dir (default: a temporary directory)")
    ap.add_argument("--json", metavar="PATH", help="write the report (with every sample)")
    ap.add_argument("--harness-json", default=None, help="where the harness writes its result")
    ap.add_argument("--server-log", default=None, help="the server's log file")
    ap.add_argument("--quiet", action="store_true", help="no line per sample")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """``guildcast loadtest soak [options]``: the exit status (0: every bound held)."""
    a = build_parser().parse_args(argv)
    a.argv = list(sys.argv[1:] if argv is None else argv)
    if not 0 < a.duration <= MAX_DURATION:
        print(f"--duration must be in (0, {MAX_DURATION:.0f}]", file=sys.stderr)
        return 2
    if (
        a.interval <= 0
        or a.warmup < 0
        or a.clients < 2
        or a.guilds < 1
        or a.transient < 0
        or a.prefill < 0
    ):
        print(
            "--interval > 0, --warmup >= 0, --clients >= 2, --guilds >= 1, "
            "--transient >= 0, --prefill >= 0",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="guildcast-soak-") as tmp:
        a.harness_json = a.harness_json or os.path.join(tmp, "harness.json")
        a.server_log = a.server_log or os.path.join(tmp, "server.log")
        soak = Soak(a, a.data_dir or os.path.join(tmp, "data"))

        async def go() -> dict[str, Any]:
            try:
                return await soak.run()
            finally:
                await stop_process(soak.harness)
                await soak.server.stop()

        try:
            report = asyncio.run(go())
        except TargetError as e:
            print(f"soak: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
        summary = {k: v for k, v in report.items() if k != "samples"}
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=1))
        print(json.dumps(summary, indent=1))
        return 0 if report["ok"] else 1
