"""Every load-test scenario end to end, in a short smoke form.

Each test runs the real harness (``guildcast.loadtest.cli.main``, the code behind
``guildcast loadtest``) against a real server, embedded unless said
otherwise, with a few dozen clients for a few seconds, reads the ``--json``
result back and asserts the scenario's invariants: every client connected,
no gap, no duplicate, every subscriber reached the last acknowledged event,
latency recorded, and what the scenario is about (recovery, slow consumers
closed and memory bounded, churn). Never its speed: the machine is shared.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from guildcast.loadtest.cli import main
from tests.support.node import SECRET, serve_process
from tests.support.wait import output

pytestmark = pytest.mark.timeout(90)


def run(tmp_path: Path, args: str, expect: int | None = 0) -> dict[str, Any]:
    """``guildcast loadtest ARGS --quiet --json PATH``; returns the parsed
    result (``expect`` None: whatever the exit status)."""
    out = tmp_path / "result.json"
    code = main([*args.split(), "--quiet", "--json", str(out)])
    result: dict[str, Any] = json.loads(out.read_text())
    failed = [c for c in result["checks"] if not c["ok"]]
    if expect is not None:
        assert code == expect, f"exit {code}; failed checks: {failed}; notes: {result['notes']}"
    return result


def check(result: dict[str, Any], name: str) -> dict[str, Any]:
    for c in result["checks"]:
        if c["name"] == name:
            assert c["ok"], c
            return c
    raise AssertionError(f"no check {name!r} in {[c['name'] for c in result['checks']]}")


def assert_clean(result: dict[str, Any], clients: int) -> None:
    """The invariants every scenario shares."""
    assert result["ok"], [c for c in result["checks"] if not c["ok"]]
    assert result["connect"]["connected"] == clients
    d = result["delivery"]
    assert d["gaps"] == d["gap_events"] == d["dups"] == d["unexpected"] == 0
    assert d["lagging"] == 0
    assert d["delivered"] > 0
    assert result["publish"]["acked"] > 0
    for name in ("no gaps", "no duplicates", "every subscriber reached the last acknowledged s"):
        check(result, name)


def test_bigguild(tmp_path: Path) -> None:
    r = run(tmp_path, "bigguild --server embedded --clients 30 --duration 2")
    assert_clean(r, 30)
    assert r["params"]["guilds"] == 1 and r["params"]["rate"] == 0
    # One guild: every client got every acknowledged event.
    assert r["delivery"]["delivered"] >= 30 * r["publish"]["acked"]
    assert r["latency_us"]["count"] == r["delivery"]["delivered"]
    assert r["server"]["shared_with_harness"] is True
    assert r["timeline"] and r["harness"]["processes"]


def test_manyguilds_with_deflate(tmp_path: Path) -> None:
    """--deflate: subscribers negotiate permessage-deflate and inflate the
    shared compressed frames; --pad text makes events that compress as chat
    does; nothing is lost, and the wire carries fewer bytes than it inflates to."""
    r = run(
        tmp_path,
        "manyguilds --server embedded --clients 40 --guilds 4 --duration 2 "
        "--deflate --pad text --size 400",
    )
    assert_clean(r, 40)
    d = r["delivery"]
    assert r["params"]["deflate"] is True and r["params"]["pad"] == "text"
    assert d["inflated_in"] > 0 and d["inflated_out"] > d["inflated_in"]
    assert r["latency_us"]["count"] == d["delivered"]
    plain = run(tmp_path, "manyguilds --server embedded --clients 40 --guilds 4 --duration 1")
    assert plain["delivery"]["inflated_in"] == 0


def test_latency_over_http(tmp_path: Path) -> None:
    r = run(tmp_path, "latency --server embedded --clients 30 --rate 50 --duration 2 --via http")
    assert_clean(r, 30)
    assert r["publish"]["via"] == "http"
    lat = r["latency_us"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert r["publish"]["ack_latency_us"]["count"] == r["publish"]["acked"]


def test_manyguilds(tmp_path: Path) -> None:
    r = run(tmp_path, "manyguilds --server embedded --clients 40 --guilds 10 --duration 2")
    assert_clean(r, 40)
    check(r, "latency recorded")


def test_passive(tmp_path: Path) -> None:
    """Each client in 5 of 10 guilds, 1 active: every event reaches exactly
    the 4 clients active in its guild, the passive ones hear notices; all
    active, every event reaches its 20 members."""
    args = "passive --server embedded --clients 40 --guilds 10 --per-client 5 --rate 100"
    args += " --duration 2 --server-opt passive_interval=0.2"
    r = run(tmp_path, args)
    assert_clean(r, 40)
    assert r["delivery"]["delivered"] == 4 * r["publish"]["acked"]
    assert r["delivery"]["notices"] > 0
    r = run(tmp_path, args + " --active 5")
    assert_clean(r, 40)
    assert r["delivery"]["delivered"] == 20 * r["publish"]["acked"]
    assert r["delivery"]["notices"] == 0


def test_passive_batched_notices_and_a_pipelining_publisher(tmp_path: Path) -> None:
    """``--activity-batch``: clients ask for a tick's notices in one message
    and count one notice per passive guild in it; ``--publish-tick``: the
    publisher writes what fell due every 20 ms. Same deliveries either way."""
    args = "passive --server embedded --clients 40 --guilds 10 --per-client 5 --rate 100"
    args += " --duration 2 --server-opt passive_interval=0.2 --activity-batch --publish-tick 0.02"
    r = run(tmp_path, args)
    assert_clean(r, 40)
    assert r["params"]["activity_batch"] is True and r["params"]["publish_tick"] == 0.02
    assert r["delivery"]["delivered"] == 4 * r["publish"]["acked"]
    assert r["publish"]["acked"] >= 150  # the rate holds with writes every 20 ms
    assert r["delivery"]["notices"] > 0


def test_connect(tmp_path: Path) -> None:
    r = run(tmp_path, "connect --server embedded --clients 50 --guilds 5 --duration 1")
    assert_clean(r, 50)
    # The probe: one event per guild reached every idle connection.
    assert r["publish"]["acked"] == 5
    assert r["delivery"]["delivered"] == 50
    assert r["connect"]["per_s"] > 0
    assert r["connect"]["rss_per_connection"] is not None


def test_churn(tmp_path: Path) -> None:
    r = run(
        tmp_path,
        "churn --server embedded --clients 40 --guilds 4 --rate 100 --duration 3 "
        "--churn-life 0.2,0.5",
    )
    assert_clean(r, 40)
    c = check(r, "clients churned")
    assert r["churn"]["leaves"] > 0 and r["churn"]["resubscribes"] > 0, c


def test_reconnect_embedded_disconnect_all(tmp_path: Path) -> None:
    r = run(tmp_path, "reconnect --server embedded --clients 30 --guilds 3 --rate 100 --duration 2")
    assert_clean(r, 30)
    assert r["reconnect"]["mode"] == "disconnect_all"
    assert r["reconnect"]["recovery_seconds"] > 0
    assert r["clients"]["closes"].get("4000") == 30
    check(r, "every client reconnected")
    check(r, "every subscription recovered")
    assert r["delivery"]["unrecovered"] == 0


def test_reconnect_server_process_restart(tmp_path: Path) -> None:
    """A real server process, restarted mid-stream with its data directory:
    every client recovers from its Position across the restart."""
    r = run(tmp_path, "reconnect --server process --clients 20 --guilds 2 --rate 100 --duration 3")
    assert_clean(r, 20)
    assert r["reconnect"]["mode"] == "restart"
    assert r["server"]["shared_with_harness"] is False and r["server"]["measured"]
    assert r["server_usage"]["rss_peak"] > 0
    check(r, "every subscription recovered")


STORM_SMALL = "storm --clients 40 --guilds 4 --rate 100 --duration 4 --workers 1 --drain-timeout 60"


@pytest.mark.parametrize("mode", ["restart", "kill"])
def test_storm_one_node(tmp_path: Path, mode: str) -> None:
    """The storm, small: a server process restarted (SIGTERM, or kill -9)
    with its data directory; every client recovers, nothing lost or doubled,
    nobody gives up. (Its time against a cold start is a figure for the
    full-size run: at 40 clients the restart itself is most of it.)"""
    r = run(tmp_path, f"{STORM_SMALL} --reconnect-mode {mode}", expect=None)
    st = r["storm"]
    assert st["mode"] == mode
    for name in ("nothing lost", "nothing doubled", "nobody gave up", "every client recovered"):
        check(r, f"storm: {name}")
    check(r, "every subscription recovered")
    assert st["recovered"] >= 40 and st["cold_seconds"] > 0 and st["recovery_seconds"] > 0
    if mode == "restart":  # the fleet offers guildcast.v1: RECONNECT's delay range
        assert st["hinted_waits"] >= 40
    # Timed by the workers' clocks: never after the controller saw it; the
    # drop was noticed before every client was back.
    assert 0 < st["recovery_seconds"] <= st["recovery_mark_seconds"]
    assert 0 <= st["noticed_seconds"] < st["recovery_seconds"]
    # Nothing listens while a process restarts (its Python start alone is
    # well over the first draws): refused connects were paced as our
    # clients pace them (PROTOCOL.md "Pacing").
    assert st["refused_waits"] >= 1


@pytest.mark.timeout(150)
def test_storm_rolling_restart_of_two_workers(tmp_path: Path) -> None:
    """``--workers 2`` over a throwaway Redis, each worker restarted in turn:
    every client moves and recovers, nothing lost; the second worker is
    stopped only once the clients the first one moved are all back."""
    r = run(tmp_path, f"{STORM_SMALL} --reconnect-mode rolling", expect=None)
    assert r["storm"]["mode"] == "rolling"
    assert r["storm"]["live_at_moves"] == [40, 40]
    for name in ("nothing lost", "nothing doubled", "nobody gave up", "every client recovered"):
        check(r, f"storm: {name}")
    assert_clean(r, 40)


def test_slowconsumers(tmp_path: Path) -> None:
    r = run(
        tmp_path,
        "slowconsumers --server embedded --clients 20 --rate 1000 --size 4096 "
        f"--max-buffer {256 * 1024} --duration 3",
    )
    assert_clean(r, 20)
    assert r["slow"]["clients"] == 2
    assert sum(r["slow"]["closed"].values()) == 2
    check(r, "slow consumers were closed")
    check(r, "no other client was closed")
    check(r, "server memory bounded")
    assert r["server"]["stats"]["close_codes"].get("4010") == 2


def test_spawned_workers_and_plot(tmp_path: Path) -> None:
    png = tmp_path / "plot.png"
    r = run(
        tmp_path, f"bigguild --server embedded --clients 40 --workers 2 --duration 2 --plot {png}"
    )
    assert_clean(r, 40)
    roles = {p["role"] for p in r["harness"]["processes"]}
    assert {"worker0", "worker1"} <= roles
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every worker process it spawned is gone.
    for p in r["harness"]["processes"]:
        if p["role"].startswith("worker"):
            with pytest.raises(ProcessLookupError):
                os.kill(p["pid"], 0)


def test_refuses_non_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["latency", "--url", "ws://192.0.2.1:8080/gateway", "--secret", "x", "--quiet"])
    assert code == 2
    assert "not a loopback address" in capsys.readouterr().err


def test_guildcast_cli_delegates(capsys: pytest.CaptureFixture[str]) -> None:
    from guildcast.cli import main as guildcast

    with pytest.raises(SystemExit) as e:
        guildcast(["loadtest", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "guildcast loadtest" in out and "--clients" in out
    assert guildcast(["loadtest", "bigguild", "--url", "ws://example.com/gateway"]) == 2


async def test_a_url_run_says_it_uses_that_server(tmp_path: Path) -> None:
    """``--url`` targets a running server: the harness says so, and never that
    it is starting one."""
    async with serve_process([], tmp_path / "serve.log", api=False) as node:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",
            "-m",
            "guildcast.cli",
            "loadtest",
            "bigguild",
            "--url",
            node.url,
            f"--secret={SECRET}",
            "--clients",
            "5",
            "--duration",
            "1",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200"},
        )
        text = await output(proc, timeout=90)
    assert proc.returncode == 0, text
    assert f"using the server at {node.url}" in text, text
    assert "starting the server" not in text, text


def test_fleet_has_its_own_process_by_default(tmp_path: Path) -> None:
    """Against a server process the one subscriber fleet is spawned unless
    --inline is given, so the publisher's loop sends each event as its window
    opens (as the referee's does), not between passes over the fleet."""
    r = run(tmp_path, "bigguild --server process --clients 20 --duration 1")
    assert_clean(r, 20)
    roles = {p["role"] for p in r["harness"]["processes"]}
    assert "worker0" in roles and "controller" in roles, roles
    assert "controller+fleet" not in roles
    r = run(tmp_path, "bigguild --server process --clients 20 --duration 1 --inline")
    assert_clean(r, 20)
    roles = {p["role"] for p in r["harness"]["processes"]}
    assert "controller+fleet" in roles and "worker0" not in roles, roles


def test_the_default_gate_is_the_ack_window_or_16_kib_of_events() -> None:
    from guildcast.loadtest import scenarios as sc

    big = sc.make_plan("bigguild", {})
    assert big.max_lag == sc.GATE_BYTES // (big.size + sc.FRAME_OVERHEAD) > big.inflight
    assert sc.make_plan("bigguild", {"size": 4096}).max_lag == 8  # the window is more
    # 1,000 guilds: each subscriber gets a thousandth of what is in flight.
    many = sc.make_plan("manyguilds", {})
    assert many.max_lag == 1000 * (sc.GATE_BYTES // (many.size + sc.FRAME_OVERHEAD))
    assert sc.make_plan("manyguilds", {"guilds": 1}).max_lag == 64  # the window
    assert sc.make_plan("latency", {}).max_lag == 0  # a fixed rate: no gate
    assert sc.make_plan("bigguild", {"max_lag": 8}).max_lag == 8
