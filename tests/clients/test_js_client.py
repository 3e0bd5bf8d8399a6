"""Runs the Node test suite of clients/js/guildcast.js (``node --test``)
against a real server started here, with a control endpoint for publishing,
disconnecting and restarting."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.node import control_endpoint, restartable
from tests.support.wait import output

ROOT = Path(__file__).resolve().parents[2]
JS_TESTS = ROOT / "clients" / "js" / "test"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed (needs Node >= 20)")


def node_flags() -> list[str]:
    """Node 22+ has a global WebSocket; Node 20 needs --experimental-websocket."""
    assert NODE is not None
    probe = subprocess.run(
        [NODE, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"], check=False
    )
    return [] if probe.returncode == 0 else ["--experimental-websocket"]


async def test_node_suite_against_real_server() -> None:
    assert NODE is not None
    flags = node_flags()
    async with (
        restartable(heartbeat_interval_ms=300, history_size=500) as r,
        control_endpoint(r) as ctl,
    ):
        env = {
            **os.environ,
            "GUILDCAST_URL": r.url,
            "GUILDCAST_TOKEN": r.srv.token("js-tester", guilds=["*"], pub=["*"], pub_rate=0),
            "GUILDCAST_TOKEN_LIMITED": r.srv.token("js-limited", guilds=["js-*"], pub=["js-*"]),
            "GUILDCAST_CONTROL": ctl,
        }
        proc = await asyncio.create_subprocess_exec(
            NODE,
            *flags,
            "--test",
            "--test-concurrency=1",
            str(JS_TESTS),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        text = await output(proc, 120)
    assert proc.returncode == 0, text
    passed = re.search(r"^# pass (\d+)$", text, re.M)
    skipped = re.search(r"^# skipped (\d+)$", text, re.M)
    assert passed and skipped, text
    # Every test ran (none skipped for want of a server) and passed.
    assert int(skipped.group(1)) == 0, text
    assert int(passed.group(1)) >= 9, text
