"""Rotating the token secret without refusing a live token
(``Config.previous_secrets``, ``--previous-secret``,
``GUILDCAST_PREVIOUS_SECRETS``; the procedure is in docs/SECURITY.md).

A node verifies tokens signed with its secret or any previous secret and
signs only with its secret. The rotation below is the documented one, on a
node restarted in place with ``--data-dir``: clients holding old tokens
reconnect after each restart, recover every event, and are refused only
once the old secret is retired.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jwt
import pytest

from guildcast import Config, Server
from guildcast.cli import build_parser
from guildcast.core.tokens import TokenVerifier, make_token
from guildcast.protocol.session import AuthError
from tests.support import gateway as gw
from tests.support.node import serve_process

OLD = "old-secret-" + "0123456789abcdef" * 4
NEW = "new-secret-" + "fedcba9876543210" * 4
OTHER = "not-a-secret-of-ours-" + "0123456789abcdef" * 4


def test_verifier_accepts_current_and_previous_secrets() -> None:
    v = TokenVerifier(NEW, previous=[OLD])
    assert v(make_token(NEW, "a")).sub == "a"
    assert v(make_token(OLD, "b")).sub == "b"
    with pytest.raises(AuthError, match="Signature verification failed"):
        v(make_token(OTHER, "c"))
    # A token of an old secret is still checked in full: expired is expired.
    with pytest.raises(AuthError, match="expired"):
        v(jwt.encode({"sub": "d", "exp": int(time.time()) - 5}, OLD, "HS256"))
    # Algorithm rules hold for every secret.
    with pytest.raises(AuthError, match="alg"):
        v(jwt.encode({"sub": "e"}, OLD, "HS512"))
    with pytest.raises(ValueError):
        TokenVerifier(NEW, previous=[""])


def test_previous_secrets_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUILDCAST_PREVIOUS_SECRETS", "s1, s2,,")
    args = build_parser().parse_args(["serve"])
    assert args.previous_secrets is None and args.env_previous_secrets == ["s1", "s2"]
    args = build_parser().parse_args(["serve", "--previous-secret", "a", "--previous-secret", "b"])
    assert args.previous_secrets == ["a", "b"]


async def test_serve_accepts_a_previous_secret(tmp_path: Path) -> None:
    async with serve_process(["--previous-secret", OLD], tmp_path / "serve.log") as proc:
        ws = await gw.open_ws(proc.url)
        ready = await gw.identify(ws, make_token(OLD, "carried-over"))
        assert ready["d"]["user"] == "carried-over"
        await ws.close()
        ws = await gw.open_ws(proc.url)
        await gw.recv(ws)
        await gw.send(ws, gw.IDENTIFY, {"token": make_token(OTHER, "x"), "guilds": {}})
        await gw.expect_close(ws, 4004)


async def _node(tmp: Path, port: int, secret: str, previous: tuple[str, ...] = ()) -> Server:
    srv = Server(
        Config(
            host="127.0.0.1",
            port=port,
            secret=secret,
            previous_secrets=previous,
            data_dir=str(tmp / "data"),
            drain_timeout=5.0,
        )
    )
    await srv.start()
    return srv


async def _recover(srv: Server, token: str, pos: dict[str, Any]) -> tuple[Any, list[int]]:
    """Reconnect with ``token`` from ``pos``; returns (ws, replayed s)."""
    ws = await gw.open_ws(srv.url)
    await gw.identify(ws, token, {"room": pos})
    sub = await gw.recv(ws)
    assert sub["t"] == "SUBSCRIBED" and sub["d"]["recovered"] is True, sub
    replayed = [(await gw.recv(ws))["s"] for _ in range(sub["d"]["s"] - pos["s"])]
    return ws, replayed


async def test_rotation_procedure_loses_nothing(tmp_path: Path) -> None:
    # Step 0: the node signs and verifies with OLD; a client holds an OLD token.
    srv = await _node(tmp_path, 0, OLD)
    port = srv.port
    old_token = make_token(OLD, "alice", guilds=["room"], ttl=600)
    ws, subs = await gw.session(srv.url, old_token, {"room": None})
    epoch = subs["room"]["epoch"]
    for i in range(3):
        await srv.publish("room", "MSG", i)
    assert [(await gw.recv(ws))["s"] for _ in range(3)] == [1, 2, 3]
    await srv.stop()  # RECONNECT + 1001, as in a rolling restart
    await gw.expect_close(ws, 1001)

    # Step 1: NEW becomes the signing secret, OLD is still accepted. The
    # client reconnects with its OLD token and recovers what it missed.
    srv = await _node(tmp_path, port, NEW, previous=(OLD,))
    await srv.publish("room", "MSG", 3)
    ws, replayed = await _recover(srv, old_token, {"epoch": epoch, "s": 3})
    assert replayed == [4]
    new_token = srv.token("bob", guilds=["room"])
    assert jwt.decode(new_token, NEW, algorithms=["HS256"])["sub"] == "bob"
    ws2, _ = await gw.session(srv.url, new_token, {"room": None})
    await srv.stop()
    for w in (ws, ws2):
        await gw.expect_close(w, 1001)

    # Step 2 (once OLD tokens have expired or been replaced): OLD retired.
    srv = await _node(tmp_path, port, NEW)
    await srv.publish("room", "MSG", 4)
    ws, replayed = await _recover(srv, new_token, {"epoch": epoch, "s": 4})
    assert replayed == [5]
    late = await gw.open_ws(srv.url)
    await gw.recv(late)
    await gw.send(late, gw.IDENTIFY, {"token": old_token, "guilds": {"room": None}})
    await gw.expect_close(late, 4004)
    await ws.close()
    await srv.stop()
