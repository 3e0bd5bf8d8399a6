"""``guildcast`` as a new user and an operator run it: real subprocesses.

The first run keeps its generated secret and API key (a state file, mode
0600) so a restart accepts the same tokens; mistakes end with one readable
line and a non-zero status, never a traceback; ``guildcast token`` asks for
an explicit grant and documents ``--pub-rate 0`` as unlimited.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import jwt
import pytest

from guildcast.client import Client
from guildcast.transport import static

ROOT = Path(__file__).resolve().parents[1]
#: Generous: a cold interpreter on two busy cores.
TIMEOUT = 60.0
SECRET = "cli-tests-secret-0123456789abcdef0123456789"


def clean_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment without GUILDCAST_* and with a private state home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUILDCAST_")}
    env["XDG_STATE_HOME"] = str(tmp / "state-home")
    env.update(extra)
    return env


def run(
    tmp: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guildcast.cli", *args],
        env=env if env is not None else clean_env(tmp),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def one_line_error(r: subprocess.CompletedProcess[str], status: int, *words: str) -> str:
    """Assert ``r`` failed with ``status`` and one ``guildcast`` line naming ``words``."""
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("guildcast")]
    assert len(lines) == 1, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def exists(path: Path) -> bool:
    return path.exists()


class Serve:
    """``guildcast serve`` as a subprocess; ``lines`` is what it printed so far."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    async def expect(self, pattern: str) -> re.Match[str]:
        """Read stdout until a line matches ``pattern``."""
        assert self.proc.stdout is not None
        for line in self.lines:
            if m := re.search(pattern, line):
                return m
        async with asyncio.timeout(TIMEOUT):
            while True:
                raw = await self.proc.stdout.readline()
                assert raw, f"serve exited before printing {pattern!r}: {self.lines}"
                line = raw.decode()
                self.lines.append(line)
                if m := re.search(pattern, line):
                    return m

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(TIMEOUT):
            return await self.proc.wait()


@asynccontextmanager
async def serve(env: dict[str, str], *args: str) -> AsyncIterator[Serve]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "guildcast.cli",
        "serve",
        "--no-uvloop",
        *args,
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    s = Serve(proc)
    try:
        yield s
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- the first run -----------------------------------------------------------------


async def test_generated_secret_and_key_survive_a_restart(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    state_file = tmp_path / "state-home" / "guildcast" / "state.json"
    seen: list[tuple[str, str, str]] = []
    for _run in range(2):
        async with serve(env, "--port", "0", "--api-port", "0") as s:
            where = (await s.expect(r"secret and API key kept in (\S+)")).group(1)
            key = (await s.expect(r"API key: (\S+)")).group(1)
            secret = (await s.expect(r"secret: (\S+)")).group(1)
            m = await s.expect(r"live demo board: http://127\.0\.0\.1:(\d+)/#token=([^&\s]+)")
            port = int(m.group(1))
            if seen:
                # A token printed by the first run is accepted by the second.
                async with Client(f"ws://127.0.0.1:{port}/gateway", seen[0][2]) as c:
                    assert c.user == "demo"
            seen.append((key, secret, m.group(2)))
            assert Path(where) == state_file
            assert await s.stop() == 0
    assert seen[0][:2] == seen[1][:2]
    assert len(seen[0][1]) >= 32  # PyJWT's minimum for HS256: no warning
    assert mode(state_file) == 0o600
    assert mode(state_file.parent) == 0o700
    # `guildcast token` with no --secret signs with the kept one.
    r = run(tmp_path, "token", "--sub", "me", "--guilds", "demo")
    assert r.returncode == 0, r.stderr
    assert jwt.decode(r.stdout.strip(), seen[0][1], algorithms=["HS256"])["sub"] == "me"


async def test_state_file_lives_in_the_data_dir(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with serve(
        clean_env(tmp_path), "--port", "0", "--api-port", "-1", "--data-dir", str(data)
    ) as s:
        where = (await s.expect(r"secret and API key kept in (\S+)")).group(1)
        await s.expect(r"gateway on")
        assert await s.stop() == 0
    assert Path(where) == data / "guildcast-state.json"
    assert mode(Path(where)) == 0o600
    assert not exists(tmp_path / "state-home")


async def test_a_given_secret_and_key_write_no_state(tmp_path: Path) -> None:
    async with serve(
        clean_env(tmp_path), "--port", "0", "--api-port", "0", "--secret", SECRET,
        "--api-key", "k" * 32,
    ) as s:  # fmt: skip
        await s.expect(r"api on")
        assert await s.stop() == 0
    assert not any("kept in" in ln or "secret:" in ln for ln in s.lines), s.lines
    assert not exists(tmp_path / "state-home")


@pytest.mark.parametrize(
    ("args", "env", "words"),
    [
        ([], {"GUILDCAST_SECRET": ""}, ("secret is empty",)),
        (["--secret", ""], {}, ("secret is empty",)),
        (["--secret", SECRET, "--api-key", ""], {}, ("--api-key is empty",)),
        (["--secret", SECRET], {"GUILDCAST_API_KEYS": " , "}, ("GUILDCAST_API_KEYS", "empty")),
    ],
)
def test_an_empty_secret_or_key_is_refused(
    tmp_path: Path, args: list[str], env: dict[str, str], words: tuple[str, ...]
) -> None:
    r = run(tmp_path, "serve", "--port", "0", *args, env=clean_env(tmp_path, **env))
    one_line_error(r, 2, *words)


# --- guildcast token ---------------------------------------------------------------


def test_token_grant_is_explicit_and_help_is_true(tmp_path: Path) -> None:
    r = run(tmp_path, "token", "--secret", SECRET, "--sub", "me")
    assert r.returncode == 2 and "--guilds" in r.stderr  # no silent "every guild"
    r = run(tmp_path, "token", "--help")
    help_text = " ".join(r.stdout.split())
    assert "0: unlimited" in help_text and "0: none" not in help_text
    assert re.search(r"--secret SECRET\s+the server's HS256 secret", help_text), help_text
    # The referee's exact command: --pub-rate 0 is a claim of 0, which the
    # server reads as unlimited (docs/PROTOCOL.md).
    r = run(
        tmp_path, "token", "--secret", SECRET, "--sub", "pub", "--guilds", "*", "--pub", "*",
        "--pub-rate", "0",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    claims = jwt.decode(r.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["guilds"] == ["*"] and claims["pub"] == ["*"] and claims["pub_rate"] == 0


def test_token_without_any_secret_says_how(tmp_path: Path) -> None:
    r = run(tmp_path, "token", "--sub", "me", "--guilds", "x")
    assert r.returncode == 2
    assert "give --secret" in r.stderr and "Traceback" not in r.stderr


async def test_the_demo_page_hint_command_works_as_printed(tmp_path: Path) -> None:
    html = static.response_for("/")
    assert html is not None
    m = re.search(rb'<code id="token-hint">guildcast ([^<]+)</code>', html.body or b"")
    assert m, "the page has no token hint"
    words = [w.strip("'") for w in m.group(1).decode().split()]
    env = clean_env(tmp_path)
    async with serve(env, "--port", "0", "--api-port", "-1") as s:
        port = int((await s.expect(r"gateway on ws://127\.0\.0\.1:(\d+)")).group(1))
        r = run(tmp_path, *words, env=env)
        assert r.returncode == 0, r.stderr
        async with Client(f"ws://127.0.0.1:{port}/gateway", r.stdout.strip()) as c:
            assert c.user == "me"
            assert await c.publish("demo", "CARD_ADDED", {"text": "hi"}) == 1
        assert await s.stop() == 0


# --- errors a person can read ------------------------------------------------------


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args in (["--port", port, "--api-port", "-1"], ["--port", "0", "--api-port", port]):
            r = run(tmp_path, "serve", "--secret", SECRET, "--api-key", "k" * 32, *args)
            one_line_error(r, 1, "cannot listen", port, "in use")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--redis", "http://127.0.0.1:6379"], ("--redis", "redis://")),
        (["--redis", "redis://127.0.0.1:notaport/0"], ("--redis", "not a URL")),
        (["--redis", "redis://127.0.0.1:6379/zero"], ("--redis", "database")),
        (["--redis", "redis://127.0.0.1:6379/0", "--data-dir", "d"], ("--redis", "--data-dir")),
    ],
)
def test_bad_redis_settings_are_one_line(
    tmp_path: Path, args: list[str], words: tuple[str, ...]
) -> None:
    one_line_error(run(tmp_path, "serve", "--secret", SECRET, *args), 2, *words)


def test_a_passive_interval_of_zero_is_one_line(tmp_path: Path) -> None:
    r = run(tmp_path, "serve", "--secret", SECRET, "--passive-interval", "0")
    one_line_error(r, 2, "--passive-interval", "> 0")


@pytest.mark.parametrize(
    ("var", "raw"),
    [
        ("GUILDCAST_PORT", "eighty"),
        ("GUILDCAST_HISTORY_TTL", "5 minutes"),
        ("GUILDCAST_METRICS_OPEN", "maybe"),
        ("GUILDCAST_WORKERS", "two"),
    ],
)
def test_a_bad_environment_variable_is_one_line_and_spares_token(
    tmp_path: Path, var: str, raw: str
) -> None:
    env = clean_env(tmp_path, **{var: raw})
    one_line_error(run(tmp_path, "serve", "--secret", SECRET, env=env), 2, var, repr(raw))
    r = run(tmp_path, "token", "--secret", SECRET, "--sub", "me", "--guilds", "g", env=env)
    assert r.returncode == 0, r.stderr
    assert jwt.decode(r.stdout.strip(), SECRET, algorithms=["HS256"])["sub"] == "me"


def test_loadtest_without_its_extra_is_one_line(tmp_path: Path) -> None:
    # An import blocker stands in for an installation without the extra.
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    for name in ("hdrh", "rich", "psutil", "matplotlib"):
        (blocker / name).mkdir()
        (blocker / name / "__init__.py").write_text(
            f'raise ModuleNotFoundError("No module named {name!r}", name={name!r})\n'
        )
    env = clean_env(tmp_path, PYTHONPATH=str(blocker))
    r = run(tmp_path, "loadtest", "bigguild", "--clients", "1", env=env)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "pip install 'guildcast[loadtest]'" in r.stderr
    assert re.search(r"guildcast loadtest: (hdrh|rich|psutil|matplotlib) is missing", r.stderr)


async def test_a_data_dir_in_use_or_unusable_is_one_line(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    data = tmp_path / "data"
    common = ["serve", "--port", "0", "--api-port", "-1", "--secret", SECRET]
    async with serve(env, "--port", "0", "--api-port", "-1", "--secret", SECRET, "--data-dir",
                     str(data)) as s:  # fmt: skip
        await s.expect(r"gateway on")
        r = await asyncio.to_thread(run, tmp_path, *common, "--data-dir", str(data))
        one_line_error(r, 1, "in use by another node")
        assert await s.stop() == 0
    afile = tmp_path / "a-file"
    afile.write_text("not a directory")
    r = await asyncio.to_thread(run, tmp_path, *common, "--data-dir", str(afile))
    one_line_error(r, 1, str(afile))


async def test_own_secret_without_a_key_gets_a_key_for_this_run(tmp_path: Path) -> None:
    keys = []
    for _run in range(2):
        async with serve(
            clean_env(tmp_path), "--port", "0", "--api-port", "0", "--secret", SECRET
        ) as s:
            keys.append((await s.expect(r"generated API key for this run: (\S+)")).group(1))
            await s.expect(r"api on")
            assert await s.stop() == 0
    assert keys[0] != keys[1]
    assert not any("kept in" in ln or "secret:" in ln for ln in s.lines), s.lines
    assert not exists(tmp_path / "state-home")


async def test_no_demo_flag_and_gateway_health(tmp_path: Path) -> None:
    from tests.clients.test_demo_static import http_get

    for env in (clean_env(tmp_path), clean_env(tmp_path, GUILDCAST_NO_DEMO="1")):
        args = ["--port", "0", "--api-port", "-1", "--secret", SECRET]
        flag = [] if "GUILDCAST_NO_DEMO" in env else ["--no-demo"]
        async with serve(env, *args, *flag) as s:
            port = int((await s.expect(r"gateway on ws://127\.0\.0\.1:(\d+)")).group(1))
            assert (await http_get(port, "/"))[0] == 404
            assert (await http_get(port, "/favicon.ico"))[0] == 204
            assert (await http_get(port, "/healthz"))[0] == 200
            assert (await http_get(port, "/readyz"))[0] == 200
            assert await s.stop() == 0


def test_an_unusable_state_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "state.json"
    bad.write_text("{not json")
    r = run(tmp_path, "serve", "--port", "0", "--state-file", str(bad))
    one_line_error(r, 2, str(bad), "not JSON", "--secret")
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    r = run(tmp_path, "serve", "--port", "0", "--state-file", str(blocked / "state.json"))
    one_line_error(r, 2, "the state file", "Not a directory")


def test_a_negative_max_rewind_is_one_line(tmp_path: Path) -> None:
    """PROTOCOL.md "Rewind": 0 turns rewinds off; below it is no setting."""
    one_line_error(
        run(tmp_path, "serve", "--secret", SECRET, "--max-rewind", "-1"), 2, "--max-rewind"
    )
