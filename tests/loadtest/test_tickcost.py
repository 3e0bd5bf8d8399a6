"""``guildcast loadtest tickcost`` (the passive tick's own Python, quoted in
docs/BENCHMARKS.md "Passive subscriptions") runs small and reports both
notice forms, the batch smaller per session than single notices. It asserts
no speed: CPU time of a shared machine is not a test."""

from __future__ import annotations

import re
import subprocess
import sys


def test_tickcost_reports_single_and_batched_notices() -> None:
    args = ["--sessions", "200", "--guilds", "40", "--per-session", "5", "--ticks", "3"]
    out = subprocess.run(
        [sys.executable, "-P", "-m", "guildcast.loadtest", "tickcost", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    rows = re.findall(
        r"^(single|batch)\s+tick CPU:\s+([0-9.]+) ms fastest,\s+([0-9.]+) ms median; "
        r"\s*([0-9.]+) notice bytes per session$",
        out,
        re.M,
    )
    assert [r[0] for r in rows] == ["single", "batch"], out
    single, batch = (float(r[3]) for r in rows)
    # 5 passive guilds, ~63% moved a tick: ~3 notices of ~50 bytes against
    # one batch of ~3 entries.
    assert 0 < batch < single, out
    assert all(float(r[1]) <= float(r[2]) for r in rows), out
