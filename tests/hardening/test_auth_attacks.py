"""Authentication and authorisation attacks against a running node, each
answered as PROTOCOL.md says (close 4004, ERROR 4403, or 1009/4002 where
the attack is not even a well-formed message) and each leaving a log line
that says why, with no token contents in it.

(tests/core/test_tokens.py checks the verifier alone; here every attack goes
through a real socket, the gateway, the session and the log. With
``--data-dir`` set, guild ids chosen to escape a pattern or the data
directory are refused or stay inside it.)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from guildcast import Server
from guildcast.core import journal
from guildcast.core.ratelog import RateLimitedLog
from guildcast.core.tokens import MAX_TOKEN_BYTES
from guildcast.transport import gateway
from tests.support import gateway as gw
from tests.support.api import KEY, Api
from tests.support.node import SECRET, api_server


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], key: bytes) -> str:
    """A JWT with any header, signed HMAC-SHA256 with ``key``."""
    h = _b64(json.dumps(header).encode())
    p = _b64(json.dumps(claims).encode())
    sig = hmac.new(key, f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{_b64(sig)}"


# A made-up RSA public key in PEM: what an attacker hopes the server would use
# as an HMAC secret if it trusted the token's own "alg" (algorithm confusion).
_PUBLIC_PEM = (
    b"-----BEGIN PUBLIC KEY-----\n"
    b"MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAu1SU1LfVLPHCozMxH2Mo\n"
    b"-----END PUBLIC KEY-----\n"
)
CLAIMS = {"sub": "mallory", "guilds": ["*"], "pub": ["*"]}
ALG_NONE = json.dumps({"alg": "none", "typ": "JWT"}).encode()


def attacks() -> dict[str, tuple[str, str]]:
    """name -> (token, words the log line must contain)."""
    now = int(time.time())
    return {
        "alg none": (f"{_b64(ALG_NONE)}.{_b64(json.dumps(CLAIMS).encode())}.", "alg"),
        "another secret": (
            jwt.encode(CLAIMS, "another-secret-0123456789abcdef0123456", "HS256"),
            "Signature verification failed",
        ),
        "RS256 header, signed with a public key as HMAC secret": (
            _forge({"alg": "RS256", "typ": "JWT"}, CLAIMS, _PUBLIC_PEM),
            "alg",
        ),
        "RS256 header, signed with the server secret": (
            _forge({"alg": "RS256", "typ": "JWT"}, CLAIMS, SECRET.encode()),
            "alg",
        ),
        "kid pointing at a file, empty key": (
            _forge({"alg": "HS256", "kid": "../../../../dev/null"}, CLAIMS, b""),
            "Signature verification failed",
        ),
        "expired": (
            jwt.encode({**CLAIMS, "exp": now - 5}, SECRET, "HS256"),
            "expired",
        ),
        "nbf in the future": (
            jwt.encode({**CLAIMS, "nbf": now + 3600}, SECRET, "HS256"),
            "not yet valid",
        ),
        "missing sub": (
            jwt.encode({"guilds": ["*"]}, SECRET, "HS256"),
            "sub",
        ),
        "just under max_frame": (
            jwt.encode({**CLAIMS, "pad": "p" * 45_000}, SECRET, "HS256"),
            "too long",
        ),
    }


@pytest.fixture
def every_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway logs auth failures at most once per 5 s per kind (a flood
    must not flood the log; test_auth_flood_is_logged_in_a_few_lines checks
    that); here every attack's own line is wanted."""
    monkeypatch.setattr(gateway, "_flood", RateLimitedLog(gateway.log, interval=0.0))


@pytest.mark.parametrize("name", sorted(attacks()))
async def test_token_attack_is_4004_with_a_log_line(
    server: Server, caplog: pytest.LogCaptureFixture, every_line: None, name: str
) -> None:
    token, why = attacks()[name]
    caplog.set_level(logging.INFO, logger="guildcast")
    good, _ = await gw.session(server.url, server.token("good"), {"g": None})
    ws = await gw.open_ws(server.url)
    await gw.recv(ws)
    await gw.send(ws, gw.IDENTIFY, {"token": token, "guilds": {"g": None}})
    assert await gw.expect_close(ws, 4004) == []  # no READY, no SUBSCRIBED
    lines = [r for r in caplog.records if getattr(r, "code", None) == 4004]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    line = lines[0]
    assert line.levelno in (logging.INFO, logging.WARNING)
    assert why in line.getMessage(), line.getMessage()
    assert "127.0.0.1" in line.getMessage()
    _no_token_in_log(caplog, token)
    await gw.still_open(good)  # others are untouched
    await good.close()


def _no_token_in_log(caplog: pytest.LogCaptureFixture, token: str) -> None:
    """Neither the token nor any of its three parts is in any log record."""
    parts = [p for p in token.split(".") if len(p) >= 8] or [token]
    for r in caplog.records:
        text = r.getMessage() + repr(r.__dict__)
        for p in parts:
            assert p[:40] not in text, (r.getMessage(), p[:40])


async def test_a_1_mib_token_is_1009_before_it_is_read(server: Server) -> None:
    """A 1 MiB token makes the IDENTIFY message 1 MiB: over ``max_frame``
    (64 KiB), so the transport closes with 1009 before any JSON or JWT work;
    a token just under ``max_frame`` is 4004 (test above: the verifier
    refuses anything over ``MAX_TOKEN_BYTES`` before parsing it)."""
    ws = await gw.open_ws(server.url, max_size=None)
    await gw.recv(ws)
    token = "a" * (1024 * 1024)
    await gw.send(ws, gw.IDENTIFY, {"token": token, "guilds": {}})
    await gw.expect_close(ws, 1009)
    assert MAX_TOKEN_BYTES < 60_000 < server.config.max_frame


async def test_auth_flood_is_logged_in_a_few_lines(
    server: Server, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """100 failed IDENTIFYs in a burst: every one is closed 4004 and counted,
    the log gets at most two lines (one per 5 s; the next says how many were
    left out) so an attacker cannot fill the disk through the log."""
    # The production limiter, fresh (the module's one remembers other tests).
    monkeypatch.setattr(gateway, "_flood", RateLimitedLog(gateway.log))
    caplog.set_level(logging.INFO, logger="guildcast")
    before = server.gateway.close_codes.get(4004, 0)
    bad = jwt.encode({"sub": "x"}, "wrong-secret-0123456789abcdef01234567", "HS256")
    for _ in range(100):
        ws = await gw.open_ws(server.url)
        await gw.recv(ws)
        await gw.send(ws, gw.IDENTIFY, {"token": bad, "guilds": {}})
        await gw.expect_close(ws, 4004)
    assert server.gateway.close_codes.get(4004, 0) - before == 100
    lines = [r for r in caplog.records if getattr(r, "code", None) == 4004]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]


# --- authorisation: patterns and guild ids ---------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "gid", "outcome"),
    [
        (["team-1"], "team-1", "ok"),
        (["team-1"], "team-10", 4403),
        (["team-1"], "TEAM-1", 4403),  # case matters
        (["team-1"], "team-1.", 4403),
        (["team-*"], "team-..", "ok"),  # a valid id, and no path: see the data-dir test
        (["team-*"], "team", 4403),
        (["team-*"], "xteam-1", 4403),
        (["team-?"], "team-12", 4403),
        (["team-?"], "team-.", "ok"),
        (["team-*"], "team-../../etc", 4002),  # "/" is not a guild id character
        (["team-*"], "team-1\x00", 4002),
        (["team-*"], "team-*", 4002),  # "*" neither
        (["team-*"], "team-" + "x" * 124, 4002),  # 129 characters
        (["*"], "", 4002),
        (["*"], "..", "ok"),
    ],
)
async def test_subscribe_outside_the_patterns(
    server: Server,
    caplog: pytest.LogCaptureFixture,
    every_line: None,
    patterns: list[str],
    gid: str,
    outcome: int | str,
) -> None:
    caplog.set_level(logging.INFO, logger="guildcast")
    ws, _ = await gw.session(server.url, server.token("u", guilds=patterns))
    await gw.send(ws, gw.SUBSCRIBE, {"guilds": {gid: None}})
    if outcome == 4002:
        await gw.expect_close(ws, 4002)
        return
    m = await gw.recv(ws)
    if outcome == "ok":
        assert m["t"] == "SUBSCRIBED" and m["g"] == gid, m
    else:
        assert m["op"] == gw.ERROR and m["d"]["code"] == 4403 and m["d"]["g"] == gid, m
        (line,) = [r for r in caplog.records if getattr(r, "code", None) == 4403]
        assert gid in line.getMessage() and "'u'" in line.getMessage()
        await gw.still_open(ws)
    await ws.close()


async def test_publish_outside_the_patterns(
    server: Server, caplog: pytest.LogCaptureFixture, every_line: None
) -> None:
    caplog.set_level(logging.INFO, logger="guildcast")
    tok = server.token("writer", guilds=["*"], pub=["team-*"], pub_rate=0)
    ws, _ = await gw.session(server.url, tok)
    refused = ["other", "team", "TEAM-1", "xteam-1", ".."]
    for i, gid in enumerate([*refused, "team-1"]):
        await gw.send(ws, gw.PUBLISH, {"guild": gid, "t": "MSG", "d": i, "nonce": str(i)})
    answers = [await gw.recv(ws) for _ in range(len(refused) + 1)]
    assert [a["d"].get("code") for a in answers] == [4403] * len(refused) + [None]
    assert answers[-1]["op"] == gw.ACK and answers[-1]["d"]["s"] == 1
    logged = {getattr(r, "guild", None) for r in caplog.records if getattr(r, "code", 0) == 4403}
    assert logged == set(refused)
    # Nothing was sequenced in a refused guild.
    for gid in refused:
        assert (await server.hub.info(gid))["s"] == 0
    await ws.close()


async def test_guild_ids_never_leave_the_data_dir(tmp_path: Path) -> None:
    """With ``--data-dir``, every guild id that looks like a path (or is as
    long as allowed) is either refused (not a guild id: 4002 on the gateway,
    400 on the API) or stored in a journal named after its encoding inside
    ``DATA/guilds``. No file appears anywhere else."""
    root = tmp_path / "root"
    data = root / "data"
    root.mkdir()
    (root / "sentinel").write_text("x")
    before = _files(tmp_path)
    async with api_server(data_dir=str(data), api_publish_rate=0) as srv:
        tok = srv.token("w", guilds=["*"], pub=["*"], pub_rate=0)
        valid = ["..", "...", ".", "-", "x" * 128, "a:b", ".._..", "..:.."]
        ws, _ = await gw.session(srv.url, tok)
        for gid in valid:
            await gw.send(ws, gw.PUBLISH, {"guild": gid, "t": "MSG", "d": gid})
            ack = await gw.recv(ws)
            assert ack["op"] == gw.ACK and ack["d"]["g"] == gid, ack
        await ws.close()
        invalid = ["../x", "../../../../tmp/evil", "/etc/passwd", "a\x00b", "x" * 129, "a/..", ""]
        for gid in invalid:
            ws = await gw.open_ws(srv.url)
            await gw.identify(ws, tok)
            await gw.send(ws, gw.PUBLISH, {"guild": gid, "t": "MSG", "d": None})
            await gw.expect_close(ws, 4002)
        async with Api(srv.api_url, KEY) as api:
            for gid in invalid:
                status, body, _ = await api.publish({"guild": gid, "t": "MSG", "d": None})
                assert status == 400 and body["error"] == "invalid_guild", (gid, body)
            for path in [
                "/v1/guilds/..%2F..%2Fetc/history",
                "/v1/guilds/%2e%2e%2f%2e%2e/history",
                "/v1/guilds/a%00b",
                "/v1/guilds/" + "y" * 129,
            ]:
                status, _, _ = await api.get(path)
                assert status in (400, 404), (path, status)
            for gid in valid:
                status, body, _ = await api.get(f"/v1/guilds/{gid}/history")
                if gid in (".", ".."):
                    # URL normalisation turns these paths into others: never a file.
                    assert status in (200, 400, 404), (gid, status)
                    continue
                assert status == 200 and body["s"] == 1, (gid, body)
    after = _files(tmp_path)
    new = after - before
    assert new, "the node wrote no journal at all"
    outside = [p for p in new if not p.is_relative_to(data)]
    assert outside == [], outside
    names = {p.name for p in new if p.parent == data / "guilds" and p.suffix == ".log"}
    assert {journal.guild_of(n) for n in names} >= set(valid)
    assert all(len(n) < 255 for n in names)


def _files(top: Path) -> set[Path]:
    return {Path(d) / f for d, _, fs in os.walk(top) for f in fs}
