"""What a person sees: live progress while a run goes, a summary table at the
end, the JSON result and the plot.

Owns nothing but output. Progress goes to stderr (a rich Live panel on a
terminal, one plain line a second otherwise); the summary goes to stdout.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table


def _ms(us: float | None) -> str:
    if us is None:
        return "-"
    return f"{us / 1000:.2f}"


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 1048576:.1f}"


class Progress:
    """Connected, delivered/s and p99 so far, refreshed every tick."""

    def __init__(self, scenario: str, quiet: bool) -> None:
        self.scenario = scenario
        self.quiet = quiet
        self.console = Console(stderr=True, soft_wrap=True)
        self.live: Live | None = None
        self._last_line = 0.0
        self._p99: float | None = None
        if not quiet and self.console.is_terminal:
            self.live = Live(console=self.console, refresh_per_second=4, transient=True)
            self.live.start()

    def log(self, msg: str) -> None:
        if not self.quiet:
            self.console.print(f"[dim]loadtest:[/dim] {msg}", highlight=False)

    def update(self, row: dict[str, Any], clients: int, p99_total: float | None) -> None:
        if self.quiet:
            return
        if p99_total is not None:
            self._p99 = p99_total  # refreshed every few ticks (it costs ~1 ms)
        p99_total = self._p99
        cols = {
            "t": f"{row['t']:.1f}s",
            "phase": row["phase"],
            "live": f"{row['live']}/{clients}",
            "delivered/s": f"{row['delivered_per_s']:,.0f}",
            "published/s": f"{row['published_per_s']:,.0f}",
            "p99 tick ms": _ms(row.get("lat_p99")),
            "p99 run ms": _ms(p99_total),
            "gaps/dups": f"{row['gaps']}/{row['dups']}",
            "server cpu%": str(row.get("server_cpu_pct", "-")),
            "server MiB": _mib(row.get("server_rss")),
            "harness cpu%": str(row.get("harness_cpu_pct", "-")),
        }
        if self.live is not None:
            t = Table(title=f"guildcast loadtest {self.scenario}", expand=False)
            for k in cols:
                t.add_column(k, justify="right")
            t.add_row(*cols.values())
            self.live.update(t)
        elif row["t"] - self._last_line >= 1.0:
            self._last_line = row["t"]
            self.console.print(" ".join(f"{k}={v}" for k, v in cols.items()), highlight=False)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


def summary(result: dict[str, Any], console: Console | None = None) -> None:
    """Print the summary table of a finished run."""
    console = console or Console()
    t = Table(title=f"guildcast loadtest {result['scenario']} ({result['date']})")
    t.add_column("measure")
    t.add_column("value", justify="right")
    p = result["params"]
    t.add_row("clients / guilds", f"{p['clients']} / {p['guilds']}")
    t.add_row("server", f"{result['server']['mode']} ({_cpus(result['server'])})")
    c = result["connect"]
    t.add_row("connected", f"{c['connected']}/{p['clients']} in {c['seconds']:.2f} s")
    t.add_row("connect rate", f"{c['per_s']:,.0f} /s")
    if c.get("rss_per_connection") is not None:
        t.add_row("server RSS per connection", f"{c['rss_per_connection'] / 1024:.1f} KiB")
    pub = result["publish"]
    t.add_row(
        "published (acked)",
        f"{pub['acked']:,} at {pub['per_s']:,.0f}/s (target {pub['rate_target'] or 'max'})",
    )
    rc = result["reconnect"]
    if rc["mode"]:
        rs = rc["recovery_seconds"]
        t.add_row(
            "sessions dropped by", f"{rc['mode']}, all back in {rs:.2f} s" if rs else rc["mode"]
        )
    st = result.get("storm")
    if st:
        t.add_row(
            "storm: recovered / cold start",
            f"{st['recovery_seconds']} s / {st['cold_seconds']} s "
            f"(start {st['server_start_seconds']} s + connect {st['connect_seconds']} s): "
            f"{st['recovery_over_cold']}x",
        )
        t.add_row(
            "storm: lost / doubled / gave up",
            f"{st['lost']} / {st['doubled']} / {st['gave_up']}",
        )
        t.add_row(
            "storm: 1013 refused / hinted waits / replayed",
            f"{st['refused_1013']} / {st['hinted_waits']} / {st['replayed']}",
        )
        for key, when in (
            ("live_latency_before_us", "before"),
            ("live_latency_during_us", "during"),
        ):
            ld = st.get(key) or {}
            if ld.get("count"):
                t.add_row(
                    f"storm: live latency {when}, ms p50 / p99 / max",
                    " / ".join(_ms(ld[k]) for k in ("p50", "p99", "max")),
                )
    d = result["delivery"]
    t.add_row("delivered", f"{d['delivered']:,}")
    t.add_row("deliveries/s (publish phase)", f"{d['per_s']:,.0f}")
    t.add_row("deliveries/s (best tick)", f"{d['per_s_peak']:,.0f}")
    t.add_row("gaps / dups / lagging", f"{d['gap_events']} / {d['dups']} / {d['lagging']}")
    lat = result["latency_us"]
    if lat.get("count"):
        t.add_row(
            "latency ms p50 / p99 / p99.9 / max",
            " / ".join(_ms(lat[k]) for k in ("p50", "p99", "p999", "max")),
        )
    su = result["server_usage"]
    if su.get("cpu_per_delivery_us") is not None:
        shared = " (shared with harness)" if result["server"]["shared_with_harness"] else ""
        t.add_row("server CPU per delivery", f"{su['cpu_per_delivery_us']:.2f} us{shared}")
    if su.get("cpu_percent") is not None:
        t.add_row("server CPU (publish phase)", f"{su['cpu_percent']:.0f}% of a core")
    t.add_row(
        "server RSS start / peak / end MiB",
        " / ".join(_mib(su.get(k)) for k in ("rss_start", "rss_peak", "rss_end")),
    )
    h = result["harness"]
    t.add_row(
        "harness CPU per process",
        ", ".join(f"{x['role']} {x['cpu_percent']:.0f}%" for x in h["processes"]),
    )
    waits = [f"{x['role']} {x['wait_percent']:.0f}%" for x in h["processes"]]
    if su.get("wait_percent") is not None:
        waits.insert(0, f"server {su['wait_percent']:.0f}%")
    t.add_row("waiting for a CPU (other load)", ", ".join(waits))
    t.add_row("limit", result["limit"])
    if h["saturated"]:
        t.add_row("[bold yellow]harness-saturated[/]", "a harness process was busy > 90%")
    for chk in result["checks"]:
        mark = "[green]ok[/]" if chk["ok"] else "[bold red]FAIL[/]"
        t.add_row(f"check: {chk['name']}", f"{mark} {chk['detail']}")
    console.print(t)


def write_json(result: dict[str, Any], path: str) -> None:
    data = json.dumps(result, indent=1, sort_keys=False, default=str)
    if path == "-":
        sys.stdout.write(data + "\n")
    else:
        Path(path).write_text(data + "\n")


def _cpus(server: dict[str, Any]) -> str:
    """The server's CPU pinning in words (None: not pinned)."""
    cpus = server.get("cpus")
    return "any CPU" if cpus is None else f"cpus {cpus}"


def plot(result: dict[str, Any], path: str) -> None:
    """Latency percentiles over time and throughput, as a small PNG."""
    import matplotlib.pyplot as plt

    fig = figure(result)
    # A 64-colour palette PNG: a fraction of the RGBA size, same picture.
    buf = io.BytesIO()
    fig.savefig(buf, dpi=80, format="png")
    plt.close(fig)
    from PIL import Image

    buf.seek(0)
    with Image.open(buf) as img:
        img.convert("RGB").quantize(colors=64).save(path, format="PNG", optimize=True)


def figure(result: dict[str, Any]) -> Any:
    """The matplotlib figure :func:`plot` saves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = result["timeline"]
    ts = [r["t"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True, dpi=80)
    for key, label in (
        ("lat_p50", "p50"),
        ("lat_p99", "p99"),
        ("lat_p999", "p99.9"),
        ("lat_max", "max"),
    ):
        pts = [(r["t"], r[key] / 1000) for r in rows if r.get(key)]
        if pts:
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], label=label, lw=1.2)
    ax1.set_ylabel("latency (ms)")
    if any(r.get("lat_p50") for r in rows):
        ax1.set_yscale("log")
        # Plain numbers ("3", "40"), not matplotlib's "3x10^0"; minor ticks
        # labelled only when the axis spans too little for major ones.
        plain = FuncFormatter(lambda v, _pos: f"{v:g}")
        ax1.yaxis.set_major_formatter(plain)
        lo, hi = ax1.get_ylim()
        ax1.yaxis.set_minor_formatter(plain if hi / max(lo, 1e-12) < 30 else NullFormatter())
        # Above the plot, out of the way of the curves.
        ax1.legend(loc="lower left", bbox_to_anchor=(0, 1.0), fontsize=8, ncol=4, frameon=False)
    ax1.grid(True, alpha=0.3)
    ax2.plot(ts, [r["delivered_per_s"] / 1000 for r in rows], label="deliveries/s (k)", lw=1.2)
    ax2.set_ylabel("deliveries/s (thousands)")
    ax2.set_xlabel("seconds")
    ax2.grid(True, alpha=0.3)
    ax3 = ax2.twinx()
    ax3.plot(ts, [r["live"] for r in rows], color="tab:gray", lw=1, ls="--", label="live clients")
    ax3.set_ylabel("live clients")
    span = max(ts, default=1.0) or 1.0
    last_label = -span
    for m in result.get("marks", []):
        for ax in (ax1, ax2):
            ax.axvline(m["t"], color="tab:red", lw=0.6, alpha=0.5)
        if m["t"] - last_label > 0.04 * span:  # labels closer than that would overlap
            last_label = m["t"]
            ax2.annotate(
                m["name"],
                (m["t"], 0.98),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                rotation=90,
                va="top",
                ha="right",
                color="tab:red",
            )
    lines = ax2.get_legend_handles_labels()
    extra = ax3.get_legend_handles_labels()
    # Below the axis, where the phase marks' labels (top of ax2) never reach.
    ax2.legend(
        lines[0] + extra[0],
        lines[1] + extra[1],
        loc="upper left",
        bbox_to_anchor=(0, -0.22),
        fontsize=8,
        ncol=2,
        frameon=False,
    )
    p = result["params"]
    srv = result["server"]
    fig.suptitle(
        f"{result['scenario']}: {p['clients']} clients, {p['guilds']} guild(s), "
        f"server {srv['mode']} ({_cpus(srv)}), {result['date'][:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    return fig
