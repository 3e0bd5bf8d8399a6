"""``guildcast loadtest sendcost`` (the per-write floor quoted in
docs/BENCHMARKS.md) runs end to end on loopback, small and short, and
reports a positive CPU cost per write for both modes.

The figure is the writer thread's own CPU time (``time.thread_time``) less
its CPU time spent pacing: other load on the machine stretches wall time,
not that, so the test holds on a busy machine (it asserts no speed).
"""

from __future__ import annotations

import re
import subprocess
import sys


def test_sendcost_reports_both_modes() -> None:
    args = ["--conns", "20", "--group", "5", "--seconds", "0.2", "--pace-us", "50"]
    out = subprocess.run(
        [sys.executable, "-P", "-m", "guildcast.loadtest", "sendcost", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    found = dict(re.findall(r"^(busy|paced)\s+writer CPU per write:\s+([0-9.]+) us$", out, re.M))
    assert set(found) == {"busy", "paced"}, out
    assert all(float(v) > 0 for v in found.values()), out
