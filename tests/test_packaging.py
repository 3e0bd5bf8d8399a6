"""The distribution as a user installs it: one import name, nothing in the
current directory able to shadow it, ``guildcast --version``."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import orjson
import pytest
import websockets

from guildcast.core.tokens import make_token
from tests.support.redis import RedisProc, free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TIMEOUT = 60.0


def test_wheel_installs_one_top_level_package(tmp_path: Path) -> None:
    """The built wheel holds ``guildcast`` and its metadata, and nothing else:
    no ``server``, ``clients`` or ``loadtest`` beside it."""
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    out = subprocess.run(
        [*pip, "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (wheel,) = tmp_path.glob("guildcast-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        tops = {n.split("/", 1)[0] for n in names}
        info = next(t for t in tops if t.endswith(".dist-info"))
        assert tops == {"guildcast", info}, sorted(tops)
        assert zf.read(f"{info}/top_level.txt").decode().split() == ["guildcast"]
        meta = zf.read(f"{info}/METADATA").decode()
        licences = [n for n in names if n.startswith(f"{info}/licenses/")]
    assert re.search(r"^License-Expression: Apache-2\.0$", meta, re.M), meta[:800]
    assert licences, names
    for sub in ("protocol", "client", "loadtest", "transport"):
        assert f"guildcast/{sub}/__init__.py" in names
    assert "guildcast/transport/static/guildcast.js" in names
    assert "guildcast/py.typed" in names


def test_version_flag() -> None:
    out = subprocess.run(
        [BIN / "guildcast", "--version"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    from guildcast import __version__

    assert out.stdout.strip() == f"guildcast {__version__}"
    assert __version__ != "0+unknown"


def _decoy(folder: Path) -> Path:
    """A folder as an application's might be: its own ``server.py`` and a
    ``clients`` package, each of which would leave a mark if imported."""
    mark = folder / "imported-the-decoy"
    (folder / "server.py").write_text(
        f"open({str(mark)!r}, 'a').write('server.py\\n')\nraise SystemExit(3)\n"
    )
    (folder / "clients").mkdir()
    (folder / "clients" / "__init__.py").write_text(
        f"open({str(mark)!r}, 'a').write('clients\\n')\nraise SystemExit(3)\n"
    )
    (folder / "guildcast.py").write_text(
        f"open({str(mark)!r}, 'a').write('guildcast.py\\n')\nraise SystemExit(3)\n"
    )
    return mark


async def _ready(port: int, token: str) -> dict[str, object]:
    async with asyncio.timeout(TIMEOUT):
        while True:
            try:
                ws = await websockets.connect(
                    f"ws://127.0.0.1:{port}/gateway", proxy=None, open_timeout=10
                )
                break
            except OSError:
                await asyncio.sleep(0.1)
        async with ws:
            assert orjson.loads(await ws.recv())["op"] == 10
            await ws.send(orjson.dumps({"op": 2, "d": {"token": token, "guilds": {}}}).decode())
            ready: dict[str, object] = orjson.loads(await ws.recv())
            return ready


async def test_workers_from_a_folder_with_a_decoy_server_py(tmp_path: Path) -> None:
    """``guildcast serve --workers 2`` started from a folder holding its own
    ``server.py``, ``clients/`` and ``guildcast.py`` runs Guildcast's code in
    every worker and never the folder's."""
    redis = RedisProc(tmp_path / "redis")
    (tmp_path / "redis").mkdir()
    redis.start()
    app = tmp_path / "app"
    app.mkdir()
    mark = _decoy(app)
    port = free_port()
    secret = "decoy-test-secret-0123456789abcdef0123"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUILDCAST_")}
    env["PYTHONPATH"] = ""
    proc = await asyncio.create_subprocess_exec(
        BIN / "guildcast",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-port",
        "-1",
        "--workers",
        "2",
        "--redis",
        redis.url,
        "--secret",
        secret,
        cwd=app,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        token = make_token(secret, "u", ["*"], [], None, 600)
        # Several connections: SO_REUSEPORT spreads them over both workers.
        for _ in range(6):
            ready = await _ready(port, token)
            assert ready["t"] == "READY", ready
        assert proc.returncode is None
        assert not mark.exists(), mark.read_text()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(TIMEOUT):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
        redis.stop()
    assert not mark.exists()


@pytest.mark.parametrize("module", ["guildcast.protocol", "guildcast.client"])
def test_light_imports_do_not_load_the_server(module: str) -> None:
    """A client application importing the protocol or the client library does
    not pay for the server (aiohttp, redis, the actors)."""
    code = (
        f"import sys, {module}\n"
        "heavy = [m for m in ('aiohttp', 'redis', 'guildcast.node', 'guildcast.actors')"
        " if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
