"""Words in the README and docs/OPERATIONS.md that a test can hold true
(issue "First run and operations", "Words that are not true")."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from guildcast.core.metrics import MetricsSnapshot
from guildcast.protocol.codes import PROTOCOL_VERSION, SUBPROTOCOL, Err
from guildcast.transport.http_api import ApiSettings, HttpApi

ROOT = Path(__file__).resolve().parents[1]


def readme_embedding_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    found = [b for b in blocks if "from guildcast import Config, Server" in b]
    assert len(found) == 1, "README.md needs one embedding example"
    return found[0]


async def test_readme_embedding_example_runs_without_warnings() -> None:
    code = readme_embedding_example()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "default",  # show every warning, PyJWT's short-key one among them
        "-c",
        code,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        out, _ = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 0, text
    assert "published as s = 1" in text
    assert "Warning" not in text, text


class _NoHost:
    """Enough of an ApiHost to build the routes; no request is made."""

    def metrics(self) -> MetricsSnapshot:
        return MetricsSnapshot()


def test_operations_endpoint_table_lists_every_route() -> None:
    api = HttpApi(_NoHost(), ApiSettings(keys=("k",)))  # type: ignore[arg-type]
    routes = {
        (r.method, r.resource.canonical)
        for r in api._runner.app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    assert len(routes) >= 8
    table = (ROOT / "docs" / "OPERATIONS.md").read_text()
    rows = set(re.findall(r"^\| `(GET|POST) (/[^`?]*)", table, re.M))
    assert routes <= rows, f"missing from docs/OPERATIONS.md: {sorted(routes - rows)}"


def test_readme_does_not_say_idle_guilds_change_epoch() -> None:
    # The behaviour is held by tests/integration/test_operations.py
    # (test_history_outlives_the_guild_actor_same_epoch); the words here.
    text = " ".join((ROOT / "README.md").read_text().split())
    assert "or the guild actor stops after `idle_timeout`" not in text
    assert "keeps its history and epoch" in text


def test_protocol_md_names_every_error_code_and_the_subprotocol() -> None:
    """Protocol 1.1: what a client author needs is written where they look."""
    text = (ROOT / "docs" / "PROTOCOL.md").read_text()
    assert text.startswith(f"# The Guildcast gateway protocol (version {PROTOCOL_VERSION})")
    assert f"`{SUBPROTOCOL}`" in text
    for code in Err:
        assert str(int(code)) in text, code
    assert f"| {int(Err.INVALID_EVENT_NAME)} |" in text
