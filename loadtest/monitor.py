"""The controller's view of a running load test, twice a second.

Owns the merged counters of every worker, the merged latency histograms
(total, per tick, and per phase), the psutil samples of the server process
and of the harness's own processes, and the timeline the plot is drawn from.

Consistency: worker counters are cumulative, so the latest report of each
worker is the truth and sums are taken over workers; histograms arrive as
intervals and are added exactly once. The timeline has one row per tick and
is bounded by the run's duration (at most ``MAX_DURATION / TICK`` rows).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from guildcast.loadtest.fleet import new_hist

#: Seconds between ticks (reports, samples, progress).
TICK = 0.5

#: Counters summed over workers.
SUMMED = (
    "clients",
    "live",
    "ever_live",
    "connects",
    "connect_failures",
    "reconnects",
    "reconnect_requests",
    "hinted_waits",
    "refused_waits",
    "replayed",
    "delivered",
    "gaps",
    "gap_events",
    "dups",
    "unexpected",
    "recovered",
    "unrecovered",
    "protocol_errors",
    "other_dispatches",
    "churn_leaves",
    "churn_resubscribes",
    "wire_bytes",
    "inflated_in",
    "inflated_out",
    "slow_clients",
    "slow_live",
    "lat_clamped",
    "notices",
    "bytes_in",
)
#: Per-code dicts summed over workers.
DICTS = ("closes", "errors", "slow_closed", "connect_errors")


def percentiles(h: HdrHistogram, mean: bool = False) -> dict[str, float]:
    """Summary of a microsecond histogram (empty -> count 0 only).

    One pass over the counts for the percentiles (about 1 ms); the mean is
    another, much slower pass in hdrh (tens of ms), so only on request.
    """
    n = h.get_total_count()
    if not n:
        return {"count": 0}
    pct = h.get_percentile_to_value_dict([50.0, 90.0, 99.0, 99.9])
    out = {
        "count": n,
        "min": h.get_min_value(),
        "p50": pct[50.0],
        "p90": pct[90.0],
        "p99": pct[99.0],
        "p999": pct[99.9],
        "max": h.get_max_value(),
    }
    if mean:
        out["mean"] = round(h.get_mean_value(), 1)
    return out


class ProcSampler:
    """CPU seconds and RSS of one process, surviving a restart under a new pid."""

    def __init__(self, pid: int) -> None:
        self.proc: psutil.Process | None = psutil.Process(pid)
        self.pid = pid
        self.base_user = 0.0
        self.base_system = 0.0
        self.last_user = 0.0
        self.last_system = 0.0
        self.base_wait = 0.0
        self.last_wait = 0.0

    def switch(self, pid: int) -> None:
        """The process was replaced (a restart): keep counting from where it was."""
        self.base_user += self.last_user
        self.base_system += self.last_system
        self.base_wait += self.last_wait
        self.last_user = self.last_system = self.last_wait = 0.0
        self.pid = pid
        try:
            self.proc = psutil.Process(pid)
        except psutil.Error:
            self.proc = None

    def sample(self, full: bool = True, fds: bool = True) -> dict[str, float] | None:
        """CPU seconds, and with ``full`` RSS, threads and (with ``fds``) open
        fds; listing fds costs time in proportion to connections."""
        if self.proc is None:
            return None
        rss = nfds = threads = 0
        try:
            with self.proc.oneshot():
                ct = self.proc.cpu_times()
                if full:
                    rss = self.proc.memory_info().rss
                    threads = self.proc.num_threads()
                    if fds:
                        nfds = self.proc.num_fds()
        except psutil.Error:
            return None
        self.last_user, self.last_system = ct.user, ct.system
        self.last_wait = self._wait()
        return {
            "user": self.base_user + ct.user,
            "system": self.base_system + ct.system,
            "wait": self.base_wait + self.last_wait,
            "rss": float(rss),
            "fds": float(nfds),
            "threads": float(threads),
        }

    def _wait(self) -> float:
        """Seconds the process's main thread spent runnable but waiting for a
        CPU (Linux /proc/PID/schedstat): how much other load took from it."""
        try:
            with open(f"/proc/{self.pid}/schedstat") as f:
                return int(f.read().split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0

    def tcp_established(self) -> int | None:
        """Established TCP connections of the process (reads /proc/net: slow, call rarely)."""
        if self.proc is None:
            return None
        try:
            return sum(
                1 for c in self.proc.net_connections(kind="tcp") if c.status == "ESTABLISHED"
            )
        except psutil.Error:
            return None


@dataclass
class Mark:
    name: str
    t: float
    counters: dict[str, Any]
    server: dict[str, float] | None
    #: pid -> (CPU seconds, seconds waiting for a CPU)
    harness: dict[int, tuple[float, float]]


@dataclass
class Monitor:
    started: float = field(default_factory=time.monotonic)
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)
    total: HdrHistogram = field(default_factory=new_hist)
    tick_hist: HdrHistogram = field(default_factory=new_hist)
    #: While set (a storm), every interval's latencies are added here too.
    window: HdrHistogram | None = None
    timeline: list[dict[str, Any]] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    server: ProcSampler | None = None
    harness: dict[int, ProcSampler] = field(default_factory=dict)
    harness_roles: dict[int, str] = field(default_factory=dict)
    pub_sent: int = 0
    pub_acked: int = 0
    _prev: dict[str, float] = field(default_factory=dict)
    delivered_fn: Callable[[], int] | None = None
    #: Live publisher counters ``(sent, acked)`` for marks (ticks lag by up to one).
    pub_fn: Callable[[], tuple[int, int]] | None = None
    server_peak_rss: float = 0.0
    server_peak_fds: float = 0.0

    def add_harness(self, pid: int, role: str) -> None:
        if pid not in self.harness:
            self.harness[pid] = ProcSampler(pid)
            self.harness_roles[pid] = role

    def absorb(self, reports: list[dict[str, Any]]) -> None:
        for r in reports:
            self.reports[int(r["wid"])] = r
            enc = r.get("hist")
            if enc:
                h = HdrHistogram.decode(base64.b64decode(enc))
                self.total.add(h)
                self.tick_hist.add(h)
                if self.window is not None:
                    self.window.add(h)

    def counters(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: 0 for k in SUMMED}
        for k in DICTS:
            out[k] = {}
        lag = 0
        lag_known = bool(self.reports)
        samples: list[str] = []
        for r in self.reports.values():
            for k in SUMMED:
                out[k] += r.get(k, 0)
            for k in DICTS:
                for code, n in r.get(k, {}).items():
                    out[k][code] = out[k].get(code, 0) + n
            if r.get("lagging") is None:
                lag_known = False
            else:
                lag += r["lagging"]
            samples.extend(r.get("error_samples", []))
        out["lagging"] = lag if lag_known else None
        out["error_samples"] = samples[:10]
        ats = [r.get("all_live_at") for r in self.reports.values()]
        out["all_live_at"] = max(ats) if ats and all(a is not None for a in ats) else None  # type: ignore[type-var]
        ends = [e for r in self.reports.values() if (e := r.get("ended_at")) is not None]
        out["ended_at"] = max(ends) if ends else None
        fulls = [r.get("full_at") for r in self.reports.values()]
        out["full_at"] = max(fulls) if fulls and all(f is not None for f in fulls) else None  # type: ignore[type-var]
        return out

    def sample_harness(self) -> dict[int, tuple[float, float]]:
        """CPU seconds (user + system) and run-queue wait of each harness process."""
        out = {}
        for pid, s in self.harness.items():
            x = s.sample(full=False)
            if x is not None:
                out[pid] = (x["user"] + x["system"], x["wait"])
        return out

    def fresh_counters(self) -> dict[str, Any]:
        """:meth:`counters` with ``delivered`` from ``delivered_fn`` (the
        workers' shared counters), fresher than reports, which a busy worker
        sends late."""
        c = self.counters()
        if self.delivered_fn is not None:
            c["delivered"] = max(c["delivered"], self.delivered_fn())
        return c

    def tick(self, pub_sent: int, pub_acked: int, phase: str) -> dict[str, Any]:
        """Take one timeline row."""
        now = time.monotonic()
        c = self.fresh_counters()
        # Counting the server's fds lists /proc/PID/fd (one entry per
        # connection): every 10th tick only.
        full = len(self.timeline) % 10 == 0
        srv = self.server.sample(fds=full) if self.server is not None else None
        harness = self.sample_harness()
        prev = self._prev
        dt = now - prev.get("t", self.started) or TICK
        row: dict[str, Any] = {
            "t": round(now - self.started, 3),
            "phase": phase,
            "live": c["live"],
            "delivered": c["delivered"],
            "delivered_per_s": round((c["delivered"] - prev.get("delivered", 0)) / dt, 1),
            "published_per_s": round((pub_acked - prev.get("acked", 0)) / dt, 1),
            "gaps": c["gaps"],
            "dups": c["dups"],
        }
        row.update({f"lat_{k}": v for k, v in percentiles(self.tick_hist).items()})
        self.tick_hist = new_hist()
        if srv is not None:
            cpu = srv["user"] + srv["system"]
            row["server_cpu_pct"] = round(100 * (cpu - prev.get("srv_cpu", cpu)) / dt, 1)
            row["server_rss"] = int(srv["rss"])
            if full:
                row["server_fds"] = int(srv["fds"])
            prev["srv_cpu"] = cpu
            self.server_peak_rss = max(self.server_peak_rss, srv["rss"])
            self.server_peak_fds = max(self.server_peak_fds, srv["fds"])
        hpct = {}
        for pid, (cpu, _wait) in harness.items():
            key = f"h{pid}"
            hpct[pid] = round(100 * (cpu - prev.get(key, cpu)) / dt, 1)
            prev[key] = cpu
        row["harness_cpu_pct"] = max(hpct.values()) if hpct else None
        prev["t"] = now
        prev["delivered"] = c["delivered"]
        prev["acked"] = pub_acked
        self.pub_sent, self.pub_acked = pub_sent, pub_acked
        self.timeline.append(row)
        return row

    def mark(self, name: str) -> Mark:
        m = Mark(
            name,
            time.monotonic(),
            self.fresh_counters() | self._pub(),
            self.server.sample() if self.server is not None else None,
            self.sample_harness(),
        )
        self.marks.append(m)
        return m

    def _pub(self) -> dict[str, int]:
        sent, acked = self.pub_fn() if self.pub_fn is not None else (self.pub_sent, self.pub_acked)
        return {"pub_sent": sent, "pub_acked": acked}

    def get_mark(self, name: str) -> Mark | None:
        for m in self.marks:
            if m.name == name:
                return m
        return None
