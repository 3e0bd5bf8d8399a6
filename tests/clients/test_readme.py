"""The README's Python client example works as written (only the URL and
token are substituted), run as its own process against a real server."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from guildcast import Server
from tests.support.wait import output

ROOT = Path(__file__).resolve().parents[2]


def readme_python_client_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    found = [b for b in blocks if "from guildcast.client import Client" in b]
    assert len(found) == 1, "README.md needs one ```python block using clients.Client"
    return found[0]


async def test_readme_python_example(server: Server) -> None:
    code = readme_python_client_example()
    assert len([ln for ln in code.splitlines() if ln.strip()]) <= 10  # a ten-line example
    code = code.replace("ws://127.0.0.1:8080/gateway", server.url).replace(
        "TOKEN", server.token("demo", guilds=["*"], pub=["*"])
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    text = await output(proc, 60)
    assert proc.returncode == 0, text
    assert "published as s = 1" in text
    assert "Event(guild='board-1', name='CARD_ADDED', s=1, data={'text': 'hi'})" in text
