"""PUBLISH answers leave a connection in the order the PUBLISHes came
(docs/PROTOCOL.md, "Publishing"), also when the gateway coalesces one loop
iteration's answers into one write and a later PUBLISH is refused at once.

The race needs a later PUBLISH to arrive in the loop iteration between an
earlier one's answer and that answer's write, which real sockets cannot be
made to hit on demand; so the real Gateway, Connection and Session are
driven here with a transport that records what is written."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson

from guildcast.actors.actor import Reply
from guildcast.core.host import Overloaded, PublishReply
from guildcast.core.tokens import TokenVerifier, make_token
from guildcast.protocol.session import Limits, Session
from guildcast.transport.gateway import Connection, Gateway, GatewayLimits
from tests.support.gateway import ACK, ERROR, PUBLISH, SUBSCRIBE, recv, session
from tests.support.node import node

SECRET = "answer-order-secret-0123456789abcdef0123"


class Recorder:
    """The part of an asyncio transport a Connection writes through."""

    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> Any:
        return None

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class Host:
    """A guild layer whose answers the test gives by hand; guild "busy" is
    refused at once, as a full mailbox is."""

    def __init__(self) -> None:
        #: One per PUBLISH taken: the test answers it as the guild's step would.
        self.futures: list[Reply] = []

    def publish_to(
        self,
        gid: str,
        t: str,
        d_json: bytes,
        key: str | None,
        reply: PublishReply,
    ) -> None:
        if gid == "busy":
            raise Overloaded("busy")
        self.futures.append(Reply(reply))


def publish(gid: str, nonce: str) -> bytes:
    return orjson.dumps({"op": 5, "d": {"guild": gid, "t": "E", "d": 1, "nonce": nonce}})


def identified() -> tuple[Connection, Recorder, Host]:
    host = Host()
    gw = Gateway(host, TokenVerifier(SECRET), Limits(), GatewayLimits())  # type: ignore[arg-type]
    conn = Connection(gw)
    rec = Recorder()
    conn._transport = rec  # type: ignore[assignment]
    session = Session(gw.authenticate, gw.session_limits, "sid", 0.0)
    conn.session = session
    token = make_token(SECRET, "u", ["*"], ["*"], None, 600)
    session.receive(orjson.dumps({"op": 2, "d": {"token": token, "guilds": {}}}), 0.0)
    return conn, rec, host


def nonces(out: bytearray) -> list[str]:
    return [n.decode() for n in re.findall(rb'"nonce":"(\w+)"', bytes(out))]


async def test_a_refusal_does_not_overtake_an_earlier_ack() -> None:
    conn, rec, host = identified()
    conn._on_message(publish("g1", "A"))
    host.futures[0].set_result((1, "ep"))  # the guild answers A ...
    loop = asyncio.get_running_loop()
    loop.call_soon(conn._on_message, publish("busy", "B"))  # ... and B arrives meanwhile
    loop.call_soon(conn._on_message, publish("g1", "C"))
    for _ in range(10):
        await asyncio.sleep(0)
    host.futures[1].set_result((2, "ep"))
    for _ in range(10):
        await asyncio.sleep(0)
    assert nonces(rec.out) == ["A", "B", "C"]


async def test_answers_due_are_written_before_a_close() -> None:
    conn, rec, host = identified()
    conn._on_message(publish("g1", "A"))
    host.futures[0].set_result((1, "ep"))
    await asyncio.sleep(0)  # A's answer is queued for this iteration's write
    conn.close(1001, "going away")
    # Sequenced, so answered: not dropped because the close came first.
    assert nonces(rec.out) == ["A"]


# --- a real node, a plain websockets client ------------------------------------


async def _answers(ws: Any, n: int) -> list[dict[str, Any]]:
    """The next ``n`` ACKs and ERRORs (DISPATCHes of the guild's stream skipped)."""
    out: list[dict[str, Any]] = []
    while len(out) < n:
        m = await recv(ws)
        if m["op"] in (ACK, ERROR):
            out.append(m)
    return out


def _pipelined(ws: Any, *messages: dict[str, Any]) -> None:
    """Send ``messages`` as text frames in one write (one TCP segment)."""
    for m in messages:
        ws.protocol.send_text(orjson.dumps(m))
    ws.send_data()


def _publish(gid: str, nonce: str) -> dict[str, Any]:
    return {"op": PUBLISH, "d": {"guild": gid, "t": "E", "d": {"n": nonce}, "nonce": nonce}}


async def test_a_refused_subscribe_is_answered_after_earlier_publishes() -> None:
    """PUBLISH, PUBLISH, SUBSCRIBE in one write, the SUBSCRIBE refused by the
    node (1013: the user's share of guilds is taken): the ERROR comes after
    both ACKs, in command order (PROTOCOL.md "Publishing")."""
    async with node(max_guilds=4, user_guild_share=0.25) as srv:  # one guild a user
        tok = srv.token("u", guilds=["*"], pub=["*"])
        ws, _ = await session(srv.url, tok, {"mine": None})
        for round_ in range(3):
            _pipelined(
                ws,
                _publish("mine", f"a{round_}"),
                _publish("mine", f"b{round_}"),
                {"op": SUBSCRIBE, "d": {"guilds": {f"other{round_}": None}}},
            )
            got = await _answers(ws, 3)
            assert [(m["op"], m["d"].get("nonce"), m["d"].get("g")) for m in got] == [
                (ACK, f"a{round_}", "mine"),
                (ACK, f"b{round_}", "mine"),
                (ERROR, None, f"other{round_}"),
            ], got
            assert got[2]["d"]["code"] == 1013
        # A guild the token refuses (4403, the session's own answer) waits too.
        tok2 = srv.token("v", guilds=["mine"], pub=["*"])
        ws2, _ = await session(srv.url, tok2, {"mine": None})
        _pipelined(
            ws2,
            _publish("mine", "c"),
            {"op": SUBSCRIBE, "d": {"guilds": {"forbidden": None}}},
        )
        got = await _answers(ws2, 2)
        assert [(m["op"], m["d"].get("nonce")) for m in got] == [(ACK, "c"), (ERROR, None)], got
        assert got[1]["d"]["code"] == 4403
        await ws.close()
        await ws2.close()
