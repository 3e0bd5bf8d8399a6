"""The harness's pure parts, without a server: percentiles, the merging of
worker counters, the result arithmetic and its checks, the limit verdict,
the summary table, the send-cost arithmetic and the subcommand registry."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from guildcast.loadtest import cli, report, sendcost
from guildcast.loadtest.fleet import new_hist
from guildcast.loadtest.monitor import Mark, Monitor, percentiles
from guildcast.loadtest.runner import Run, TargetOptions, _delta, _window, checks, limit_of
from guildcast.loadtest.scenarios import make_plan


def test_percentiles_of_a_histogram() -> None:
    assert percentiles(new_hist()) == {"count": 0}
    h = new_hist()
    for v in range(1, 1001):
        h.record_value(v)
    p = percentiles(h, mean=True)
    assert p["count"] == 1000
    assert p["min"] == 1 and p["max"] == 1000
    # hdrh keeps 3 significant digits: within 0.1% of the exact rank.
    assert p["p50"] == pytest.approx(500, rel=1e-3)
    assert p["p99"] == pytest.approx(990, rel=1e-3)
    assert p["p999"] == pytest.approx(999, rel=1e-3)
    assert p["mean"] == pytest.approx(500.5, rel=1e-3)
    assert "mean" not in percentiles(h)


def test_monitor_sums_the_latest_report_of_each_worker() -> None:
    mon = Monitor()
    mon.absorb(
        [
            {"wid": 0, "delivered": 5, "gaps": 1, "closes": {"4010": 1}, "lagging": 2},
            {"wid": 1, "delivered": 7, "closes": {"4010": 2, "1001": 1}, "lagging": 0},
        ]
    )
    # Counters are cumulative: a later report of worker 0 replaces its first.
    mon.absorb([{"wid": 0, "delivered": 9, "gaps": 1, "closes": {"4010": 1}, "lagging": 1}])
    c = mon.counters()
    assert c["delivered"] == 16 and c["gaps"] == 1 and c["dups"] == 0
    assert c["closes"] == {"4010": 3, "1001": 1}
    assert c["lagging"] == 1
    assert c["all_live_at"] is None
    # One worker that cannot tell its lag makes the total unknown.
    mon.absorb([{"wid": 1, "delivered": 7, "all_live_at": 3.0}])
    assert mon.counters()["lagging"] is None


def test_window_and_delta_between_marks() -> None:
    a = Mark("publish", 10.0, {"delivered": 100, "pub_acked": 4}, None, {})
    b = Mark("drained", 12.5, {"delivered": 350, "pub_acked": 9}, None, {})
    assert _window(a, b) == 2.5
    assert _delta(a, b, "delivered") == 250
    assert _delta(a, b, "pub_acked") == 5
    assert _window(None, b) == 0.0 and _delta(a, None, "delivered") == 0


@pytest.mark.parametrize(
    ("harness", "server", "shared", "limit"),
    [
        (True, True, False, "both"),
        (True, False, False, "harness"),
        (False, True, False, "server"),
        (False, False, True, "unknown (embedded: one process)"),
        (False, False, False, "neither (the load was below both)"),
    ],
)
def test_limit_verdict(harness: bool, server: bool, shared: bool, limit: str) -> None:
    assert limit_of(harness, server, shared) == limit


def _empty_result(scenario: str, **given: Any) -> tuple[Run, dict[str, Any]]:
    """The result of a run that never started: every figure from no data."""
    plan = make_plan(scenario, given)
    run = Run(plan, TargetOptions(server="embedded"), report.Progress(scenario, True), "cmd")
    return run, run._result()


def _by_name(cs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in cs}


def test_a_run_with_no_data_fails_its_checks() -> None:
    _run, r = _empty_result("bigguild", clients=10)
    assert r["ok"] is False
    assert r["connect"] == {**r["connect"], "connected": 0, "seconds": 0.0, "per_s": 0.0}
    assert r["delivery"]["per_s"] == 0.0 and r["delivery"]["window_seconds"] == 0.0
    assert r["limit"] == "unknown (embedded: one process)"
    cs = _by_name(r["checks"])
    assert cs["run completed"]["ok"]
    assert not cs["all clients connected"]["ok"]
    assert cs["all clients connected"]["detail"] == "0/10"
    assert not cs["events were acknowledged"]["ok"]
    assert not cs["latency recorded"]["ok"]


def test_checks_pass_on_a_clean_result_and_name_each_failure() -> None:
    run, r = _empty_result("churn", clients=10, guilds=2)
    final = run.monitor.counters() | {"churn_leaves": 3, "churn_resubscribes": 1}
    r["connect"]["connected"] = 10
    r["delivery"]["lagging"] = 0
    r["publish"]["acked"] = 5
    r["latency_us"] = {"count": 40}
    cs = _by_name(checks(run.plan, r, final, None, 0))
    assert all(c["ok"] for c in cs.values()), cs
    assert "clients churned" in cs and "every client reconnected" not in cs

    r["delivery"]["gaps"], r["delivery"]["gap_events"] = 1, 4
    r["delivery"]["dups"] = 2
    cs = _by_name(checks(run.plan, r, final | {"churn_leaves": 0}, "it broke", 0))
    failed = {n for n, c in cs.items() if not c["ok"]}
    assert failed == {"run completed", "no gaps", "no duplicates", "clients churned"}
    assert cs["no gaps"]["detail"] == "4 missing"
    assert cs["run completed"]["detail"] == "it broke"


def test_reconnect_and_slow_consumer_checks() -> None:
    run, r = _empty_result("reconnect", clients=4, guilds=2)
    final = run.monitor.counters() | {"reconnects": 4, "recovered": 4}
    cs = _by_name(checks(run.plan, r, final, None, 0))
    assert cs["every client reconnected"]["ok"] and cs["every subscription recovered"]["ok"]
    cs = _by_name(checks(run.plan, r, final | {"unrecovered": 1}, None, 0))
    assert not cs["every subscription recovered"]["ok"]
    # A refused publish is expected while sessions drop, and only then.
    r["publish"]["errors"] = {"close:1001": 2}
    assert _by_name(checks(run.plan, r, final, None, 0))["no publish refused"]["ok"]

    run, r = _empty_result("slowconsumers", clients=20)
    assert run.slow_count == 2
    final = run.monitor.counters() | {"closes": {"4010": 3}}
    r["slow"]["closed"] = {"4010": 2}
    r["server_usage"]["rss_start"], r["server_usage"]["rss_peak"] = 100e6, 101e6
    cs = _by_name(checks(run.plan, r, final, None, run.slow_count))
    assert cs["slow consumers were closed"]["ok"]
    assert not cs["no other client was closed"]["ok"]
    assert cs["server memory bounded"]["ok"]
    r["server_usage"]["rss_peak"] = 100e6 + 2 * 1024 * 1024 + 97 * 1024 * 1024
    assert not _by_name(checks(run.plan, r, final, None, 2))["server memory bounded"]["ok"]


def test_summary_shows_every_check() -> None:
    _run, r = _empty_result("latency", clients=3)
    buf = io.StringIO()
    report.summary(r, Console(file=buf, width=200, color_system=None))
    out = buf.getvalue()
    assert "guildcast loadtest latency" in out
    assert "0/3 in 0.00 s" in out
    for c in r["checks"]:
        assert f"check: {c['name']}" in out
    assert "FAIL 0/3" in out


def test_send_cost_arithmetic() -> None:
    assert sendcost.per_write_us(0.5, 0.2, 1000) == pytest.approx(300.0)
    assert sendcost.per_write_us(0.5, 0.0, 500_000) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        sendcost.per_write_us(0.1, 0.2, 10)  # pacing cannot exceed the mode's CPU
    with pytest.raises(ValueError):
        sendcost.per_write_us(0.1, 0.0, 0)


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_subcommand_is_registered_and_runs(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert callable(cli.subcommand(name).main)
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    assert f"guildcast loadtest {name}" in capsys.readouterr().out


def test_inline_fleet_default() -> None:
    """One fleet shares the harness's process only with --inline, or by
    default beside an embedded server; several fleets never do."""
    from guildcast.loadtest.runner import inline_fleet

    assert inline_fleet(1, TargetOptions(server="embedded"))
    assert not inline_fleet(1, TargetOptions(server="process"))
    assert not inline_fleet(1, TargetOptions(server="external"))
    assert inline_fleet(1, TargetOptions(server="process", spawn=False))
    assert not inline_fleet(1, TargetOptions(server="embedded", spawn=True))
    assert not inline_fleet(2, TargetOptions(server="embedded", spawn=False))
