"""The gateway session state machine, bytes in and effects out, no event loop.

Every state transition, close code and ERROR code that ``Session`` can
produce (PROTOCOL.md "Session flow", "Rate limits", "Close codes"), with
real HS256 tokens from ``guildcast.core.tokens``.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from guildcast.core.tokens import TokenVerifier, make_token
from guildcast.protocol.codes import Close, Err, Op
from guildcast.protocol.session import (
    CloseConn,
    Effect,
    Forbidden,
    Limits,
    Publish,
    Send,
    Session,
    State,
    Subscribe,
    Unsubscribe,
)
from tests.protocol.framing import one

SECRET = "unit-test-secret-4f1c2a-0123456789abcdef"
T0 = 1000.0


def token(sub: str = "alice", **kw: Any) -> str:
    return make_token(SECRET, sub, **kw)


def msg(op: int, d: Any = None) -> bytes:
    return orjson.dumps({"op": op, "d": d})


def new(limits: Limits | None = None, now: float = T0) -> Session:
    return Session(TokenVerifier(SECRET), limits or Limits(), "sess-1", now)


def ready(
    limits: Limits | None = None,
    now: float = T0,
    subscribe: dict[str, Any] | None = None,
    **tok: Any,
) -> Session:
    """An identified session; ``tok`` are the token's claims (``make_token`` args)."""
    s = new(limits, now)
    s.receive(msg(Op.IDENTIFY, {"token": token(**tok), "guilds": subscribe or {}}), now)
    assert s.state is State.READY
    return s


def sent(effects: list[Effect]) -> list[dict[str, Any]]:
    """The messages of every Send effect, in order."""
    return [one(e.data) for e in effects if isinstance(e, Send)]


def close_code(effects: list[Effect]) -> int:
    assert len(effects) == 1 and isinstance(effects[0], CloseConn), effects
    return effects[0].code


def assert_closed_with(s: Session, effects: list[Effect], code: int) -> None:
    assert close_code(effects) == code
    assert s.state is State.CLOSED


# --- states ------------------------------------------------------------------


def test_hello_carries_heartbeat_interval() -> None:
    s = new(Limits(heartbeat_interval_ms=1234))
    assert one(s.hello()) == {"op": Op.HELLO, "d": {"heartbeat_interval": 1234}}
    assert s.state is State.AWAIT_IDENTIFY


def test_identify_sends_ready_then_subscribes_in_order() -> None:
    s = new()
    guilds = {"g-1": None, "g-2": {"epoch": "e1", "s": 7}, "g-3": None}
    effects = s.receive(
        msg(Op.IDENTIFY, {"token": token("bob", guilds=["g-*"]), "guilds": guilds}), T0
    )
    assert s.state is State.READY
    assert isinstance(effects[0], Send)
    assert one(effects[0].data) == {
        "op": 0,
        "t": "READY",
        "d": {"session_id": "sess-1", "user": "bob"},
    }
    assert effects[1:] == [
        Subscribe("g-1", None),
        Subscribe("g-2", ("e1", 7)),
        Subscribe("g-3", None),
    ]
    assert s.subscriptions == {"g-1", "g-2", "g-3"}
    assert s.grant is not None and s.grant.sub == "bob"


def test_identify_without_guilds_is_only_ready() -> None:
    s = new()
    effects = s.receive(msg(Op.IDENTIFY, {"token": token()}), T0)
    assert [m["t"] for m in sent(effects)] == ["READY"]
    assert len(effects) == 1


def test_closed_absorbs_everything() -> None:
    s = new()
    assert_closed_with(s, s.receive(b"nope", T0), Close.DECODE_ERROR)
    assert s.receive(msg(Op.IDENTIFY, {"token": token()}), T0) == []
    assert s.receive(msg(Op.HEARTBEAT), T0) == []
    assert s.receive_binary() == []
    assert s.check_timeout(T0 + 1e9) == []
    assert s.state is State.CLOSED


def test_closed_by_transport_absorbs_and_drops_pending_answers() -> None:
    s = ready(pub=["*"], pub_rate=0)
    (p,) = s.receive(msg(Op.PUBLISH, {"guild": "g", "t": "E", "d": 1}), T0)
    assert isinstance(p, Publish)
    s.closed()
    assert s.state is State.CLOSED
    assert s.publish_done(p, "g", 1, "ep") == []
    assert s.receive(msg(Op.HEARTBEAT), T0) == []


def test_close_effect_clears_pending_publishes() -> None:
    s = ready(pub=["*"], pub_rate=0)
    (p,) = s.receive(msg(Op.PUBLISH, {"guild": "g", "t": "E", "d": 1}), T0)
    assert isinstance(p, Publish) and s.pending_publishes == 1
    assert_closed_with(s, s.receive(b"{", T0), Close.DECODE_ERROR)
    assert s.pending_publishes == 0
    assert s.publish_done(p, "g", 1, "ep") == []


# --- 4001 and 4002 -------------------------------------------------------------


@pytest.mark.parametrize("op", [0, 6, 7, 8, 9, 10, 11, 12, 13, 14, 99, -1, 2**40])
@pytest.mark.parametrize("identified", [False, True])
def test_unknown_opcode_closes_4001(op: int, identified: bool) -> None:
    s = ready() if identified else new()
    assert_closed_with(s, s.receive(msg(op), T0), Close.UNKNOWN_OPCODE)


NOT_A_COMMAND = [
    b"",
    b"not json",
    b"{",
    b"[1, 2]",
    b'"op"',
    b"2",
    b"null",
    b"{}",
    b'{"d": null}',
    b'{"op": "2", "d": null}',
    b'{"op": 2.0, "d": null}',
    b'{"op": true, "d": null}',
    b'{"op": null}',
    b'{"op": [1]}',
    b'{"op": 1, "d": "\xff\xfe"}',  # invalid UTF-8
]


@pytest.mark.parametrize("data", NOT_A_COMMAND)
@pytest.mark.parametrize("identified", [False, True])
def test_malformed_message_closes_4002(data: bytes, identified: bool) -> None:
    s = ready() if identified else new()
    assert_closed_with(s, s.receive(data, T0), Close.DECODE_ERROR)


BAD_GUILD_IDS = ["", "a" * 129, "has space", "slash/no", "é", "tab\t", "new\nline", "a\n"]
BAD_POSITIONS: list[Any] = [
    1,
    "e:1",
    [],
    {},
    {"epoch": "e"},
    {"s": 1},
    {"epoch": 1, "s": 1},
    {"epoch": "e", "s": -1},
    {"epoch": "e", "s": 1.5},
    {"epoch": "e", "s": "1"},
    {"epoch": "e", "s": True},
    {"epoch": "x" * 65, "s": 1},
]


def _bad_identifies() -> list[Any]:
    tok = token()
    cases: list[Any] = [
        None,
        [],
        "token",
        {},
        {"token": None},
        {"token": 123},
        {"token": tok, "guilds": []},
        {"token": tok, "guilds": "g-1"},
        {"token": tok, "guilds": None},
        {"token": tok, "events": "E"},
        {"token": tok, "events": [1]},
        {"token": tok, "events": ["lower"]},
        {"token": tok, "events": [""]},
        {"token": tok, "events": ["A" * 65]},
    ]
    cases += [{"token": tok, "guilds": {g: None}} for g in BAD_GUILD_IDS]
    cases += [{"token": tok, "guilds": {"g": p}} for p in BAD_POSITIONS]
    return cases


@pytest.mark.parametrize("d", _bad_identifies())
def test_bad_identify_closes_4002(d: Any) -> None:
    s = new()
    assert_closed_with(s, s.receive(msg(Op.IDENTIFY, d), T0), Close.DECODE_ERROR)


def _bad_subscribes() -> list[Any]:
    cases: list[Any] = [None, [], "g", {}, {"guilds": ["g"]}, {"guilds": None}]
    cases += [{"guilds": {g: None}} for g in BAD_GUILD_IDS]
    cases += [{"guilds": {"g": p}} for p in BAD_POSITIONS]
    # One bad entry rejects the whole message, even after good ones.
    cases.append({"guilds": {"ok": None, "": None}})
    return cases


@pytest.mark.parametrize("d", _bad_subscribes())
def test_bad_subscribe_closes_4002(d: Any) -> None:
    s = ready()
    assert_closed_with(s, s.receive(msg(Op.SUBSCRIBE, d), T0), Close.DECODE_ERROR)


@pytest.mark.parametrize(
    "d",
    [None, [], {}, {"guilds": "g"}, {"guilds": {"g": None}}, {"guilds": [1]}]
    + [{"guilds": ["ok", g]} for g in BAD_GUILD_IDS],
)
def test_bad_unsubscribe_closes_4002(d: Any) -> None:
    s = ready()
    assert_closed_with(s, s.receive(msg(Op.UNSUBSCRIBE, d), T0), Close.DECODE_ERROR)


@pytest.mark.parametrize(
    "d",
    [
        None,
        [],
        "x",
        {},
        {"guild": "g"},
        {"t": "E"},
        {"guild": 1, "t": "E"},
        {"guild": "g", "t": 1},
        {"guild": "g", "t": None},
        {"guild": "g", "t": ["E"]},
        {"guild": "g", "t": "E", "nonce": 1},
        {"guild": "g", "t": "E", "nonce": ["n"]},
        {"guild": "g", "t": "E", "nonce": "n" * 129},
    ]
    + [{"guild": g, "t": "E"} for g in BAD_GUILD_IDS],
)
def test_bad_publish_closes_4002(d: Any) -> None:
    s = ready(pub=["*"], pub_rate=0)
    assert_closed_with(s, s.receive(msg(Op.PUBLISH, d), T0), Close.DECODE_ERROR)


@pytest.mark.parametrize("identified", [False, True])
def test_binary_frame_closes_4002(identified: bool) -> None:
    s = ready() if identified else new()
    assert_closed_with(s, s.receive_binary(), Close.DECODE_ERROR)


# --- 4003, 4004, 4005 ------------------------------------------------------------


@pytest.mark.parametrize(
    "op,d",
    [
        (Op.SUBSCRIBE, {"guilds": {"g": None}}),
        (Op.UNSUBSCRIBE, {"guilds": ["g"]}),
        (Op.PUBLISH, {"guild": "g", "t": "E", "d": None}),
    ],
)
def test_command_before_identify_closes_4003(op: int, d: Any) -> None:
    s = new()
    assert_closed_with(s, s.receive(msg(op, d), T0), Close.NOT_IDENTIFIED)


def test_heartbeat_before_identify_is_answered_but_does_not_extend_deadline() -> None:
    s = new(Limits(identify_timeout=10.0))
    assert one(s.receive(msg(Op.HEARTBEAT), T0 + 5)[0].data) == {  # type: ignore[union-attr]
        "op": Op.HEARTBEAT_ACK,
        "d": None,
    }
    assert s.state is State.AWAIT_IDENTIFY
    assert s.check_timeout(T0 + 9.999) == []
    assert_closed_with(s, s.check_timeout(T0 + 10.0), Close.NOT_IDENTIFIED)


def test_identify_timeout_closes_4003() -> None:
    s = new(Limits(identify_timeout=0.5))
    assert s.check_timeout(T0) == []
    assert s.check_timeout(T0 + 0.49) == []
    assert_closed_with(s, s.check_timeout(T0 + 0.5), Close.NOT_IDENTIFIED)


@pytest.mark.parametrize(
    "tok",
    [
        "",
        "not-a-jwt",
        make_token("another-secret-0123456789abcdef0123456789", "alice"),
        make_token(SECRET, "alice", ttl=-10),
    ],
)
def test_bad_token_closes_4004(tok: str) -> None:
    s = new()
    effects = s.receive(msg(Op.IDENTIFY, {"token": tok, "guilds": {"g": None}}), T0)
    assert_closed_with(s, effects, Close.AUTH_FAILED)
    assert s.grant is None and s.subscriptions == set()


def test_second_identify_closes_4005() -> None:
    s = ready()
    effects = s.receive(msg(Op.IDENTIFY, {"token": token()}), T0)
    assert_closed_with(s, effects, Close.ALREADY_IDENTIFIED)


# --- 4008: the command window ---------------------------------------------------


def test_command_limit_closes_4008_and_counts_identify() -> None:
    lim = Limits(command_limit=5, command_window=60.0)
    s = ready(lim)  # IDENTIFY is command 1
    for i in range(4):
        effects = s.receive(msg(Op.SUBSCRIBE, {"guilds": {f"g{i}": None}}), T0 + i)
        assert effects == [Subscribe(f"g{i}", None)]
    effects = s.receive(msg(Op.UNSUBSCRIBE, {"guilds": ["g0"]}), T0 + 5)
    assert_closed_with(s, effects, Close.RATE_LIMITED)


def test_heartbeat_and_publish_do_not_count_as_commands() -> None:
    lim = Limits(command_limit=2)
    s = ready(lim, pub=["*"], pub_rate=0)
    for i in range(50):
        assert sent(s.receive(msg(Op.HEARTBEAT), T0 + i * 0.01))[0]["op"] == Op.HEARTBEAT_ACK
        (p,) = s.receive(msg(Op.PUBLISH, {"guild": "g", "t": "E", "d": i}), T0 + i * 0.01)
        assert isinstance(p, Publish)
    assert s.receive(msg(Op.SUBSCRIBE, {"guilds": {"g": None}}), T0 + 1) == [Subscribe("g", None)]
    assert_closed_with(
        s, s.receive(msg(Op.SUBSCRIBE, {"guilds": {"h": None}}), T0 + 1), Close.RATE_LIMITED
    )


def test_command_window_resets() -> None:
    lim = Limits(command_limit=3, command_window=60.0)
    s = ready(lim)  # command 1 at T0: the window opens
    for t in (T0 + 1, T0 + 2):
        assert s.receive(msg(Op.SUBSCRIBE, {"guilds": {"g": None}}), t) == [Subscribe("g", None)]
    # A new window at T0 + 60: three more are fine, the fourth is not.
    for t in (T0 + 60, T0 + 61, T0 + 62):
        assert s.receive(msg(Op.SUBSCRIBE, {"guilds": {"g": None}}), t) == [Subscribe("g", None)]
    assert_closed_with(
        s, s.receive(msg(Op.SUBSCRIBE, {"guilds": {"g": None}}), T0 + 63), Close.RATE_LIMITED
    )


def test_default_command_limit_is_120_per_60s() -> None:
    s = ready()
    for i in range(119):
        assert s.receive(msg(Op.SUBSCRIBE, {"guilds": {"g": None}}), T0 + i * 0.1)
    assert s.state is State.READY
    assert_closed_with(
        s, s.receive(msg(Op.SUBSCRIBE, {"guilds": {"g": None}}), T0 + 20), Close.RATE_LIMITED
    )


# --- 4009: heartbeats ---------------------------------------------------------------


def test_heartbeat_is_acked_and_extends_deadline() -> None:
    s = ready(Limits(heartbeat_interval_ms=1000))
    # 1.5 x interval after IDENTIFY.
    assert s.check_timeout(T0 + 1.49) == []
    assert sent(s.receive(msg(Op.HEARTBEAT), T0 + 1.4)) == [{"op": Op.HEARTBEAT_ACK, "d": None}]
    assert s.check_timeout(T0 + 2.89) == []
    assert_closed_with(s, s.check_timeout(T0 + 2.9), Close.SESSION_TIMEOUT)


def test_any_command_proves_the_connection_alive() -> None:
    s = ready(Limits(heartbeat_interval_ms=1000))
    s.receive(msg(Op.SUBSCRIBE, {"guilds": {"g": None}}), T0 + 1.0)
    assert s.check_timeout(T0 + 2.4) == []
    assert_closed_with(s, s.check_timeout(T0 + 2.5), Close.SESSION_TIMEOUT)


def test_silent_session_closes_4009() -> None:
    s = ready(Limits(heartbeat_interval_ms=200))
    assert s.check_timeout(T0 + 0.29) == []
    assert_closed_with(s, s.check_timeout(T0 + 0.3), Close.SESSION_TIMEOUT)


# --- subscribing: 4403, 4430 -------------------------------------------------------


def test_forbidden_subscribe_is_error_4403_and_no_subscribe() -> None:
    s = new()
    effects = s.receive(
        msg(
            Op.IDENTIFY,
            {"token": token(guilds=["team-*"]), "guilds": {"team-1": None, "other": None}},
        ),
        T0,
    )
    assert s.state is State.READY
    assert [m.get("t") for m in sent(effects)] == ["READY", None]
    err = sent(effects)[1]
    assert err["op"] == Op.ERROR
    assert err["d"]["code"] == Err.FORBIDDEN and err["d"]["g"] == "other"
    assert "nonce" not in err["d"] and isinstance(err["d"]["message"], str)
    assert [e for e in effects if isinstance(e, Subscribe)] == [Subscribe("team-1", None)]
    assert s.subscriptions == {"team-1"}
    effects = s.receive(msg(Op.SUBSCRIBE, {"guilds": {"team": None}}), T0)
    assert [m["d"]["code"] for m in sent(effects)] == [Err.FORBIDDEN]
    assert s.state is State.READY


def test_max_subscriptions_is_error_4430() -> None:
    s = ready(Limits(max_subscriptions=2))
    effects = s.receive(msg(Op.SUBSCRIBE, {"guilds": {"a": None, "b": None, "c": None}}), T0)
    assert [e for e in effects if not isinstance(e, Send)] == [
        Subscribe("a", None),
        Subscribe("b", None),
    ]
    (err,) = sent(effects)
    assert err["d"]["code"] == Err.TOO_MANY_SUBSCRIPTIONS and err["d"]["g"] == "c"
    # Subscribing again to a guild already held is not a new subscription.
    assert s.receive(msg(Op.SUBSCRIBE, {"guilds": {"a": {"epoch": "e", "s": 3}}}), T0) == [
        Subscribe("a", ("e", 3))
    ]
    assert s.receive(msg(Op.UNSUBSCRIBE, {"guilds": ["a"]}), T0) == [Unsubscribe("a")]
    assert s.receive(msg(Op.SUBSCRIBE, {"guilds": {"c": None}}), T0) == [Subscribe("c", None)]
    assert s.subscriptions == {"b", "c"}


def test_unsubscribe() -> None:
    s = ready(subscribe={"a": None, "b": None})
    effects = s.receive(msg(Op.UNSUBSCRIBE, {"guilds": ["a", "zzz", "a"]}), T0)
    assert effects[0] == Unsubscribe("a")
    # Not subscribed: answered at once; duplicates collapse.
    assert len(effects) == 2 and isinstance(effects[1], Send)
    assert one(effects[1].data) == {"op": 0, "t": "UNSUBSCRIBED", "g": "zzz", "d": None}
    assert s.subscriptions == {"b"}


def test_events_filter_is_recorded() -> None:
    s = new()
    s.receive(msg(Op.IDENTIFY, {"token": token(), "events": ["A_1", "B"]}), T0)
    assert s.events == frozenset({"A_1", "B"})
    s2 = ready()
    assert s2.events is None


# --- PUBLISH: 4403, 4413, 4429, ACK order -------------------------------------------


def pub(s: Session, now: float = T0, **d: Any) -> list[Effect]:
    d.setdefault("guild", "g-1")
    d.setdefault("t", "EVENT")
    return s.receive(msg(Op.PUBLISH, d), now)


def test_publish_effect_and_ack() -> None:
    s = ready(pub=["g-*"], pub_rate=0)
    (p,) = pub(s, nonce="n1", d={"x": [1, 2]})
    assert isinstance(p, Publish)
    assert (p.gid, p.t, p.d, p.nonce) == ("g-1", "EVENT", {"x": [1, 2]}, "n1")
    assert s.pending_publishes == 1
    assert sent(s.publish_done(p, "g-1", 42, "ep")) == [
        {"op": Op.ACK, "d": {"g": "g-1", "s": 42, "epoch": "ep", "nonce": "n1"}}
    ]
    assert s.pending_publishes == 0
    (p2,) = pub(s)
    assert isinstance(p2, Publish) and p2.nonce is None
    assert sent(s.publish_done(p2, "g-1", 43, "ep")) == [
        {"op": Op.ACK, "d": {"g": "g-1", "s": 43, "epoch": "ep"}}
    ]


def test_publish_failed_is_error_with_nonce_and_guild() -> None:
    s = ready(pub=["*"], pub_rate=0)
    (p,) = pub(s, nonce="n")
    assert isinstance(p, Publish)
    (err,) = sent(s.publish_failed(p, Err.TRY_AGAIN_LATER, "busy"))
    assert err == {
        "op": Op.ERROR,
        "d": {"code": 1013, "message": "busy", "nonce": "n", "g": "g-1"},
    }
    assert s.state is State.READY


def test_forbidden_publish_is_error_4403() -> None:
    s = ready(pub=["mine-*"], pub_rate=0)
    (err,) = sent(pub(s, guild="theirs", nonce="x"))
    assert err["d"]["code"] == Err.FORBIDDEN
    assert err["d"]["nonce"] == "x" and err["d"]["g"] == "theirs"
    # No ``pub`` claim: publishing nowhere.
    s2 = ready()
    (err2,) = sent(pub(s2, nonce="y"))
    assert err2["d"]["code"] == Err.FORBIDDEN and err2["d"]["nonce"] == "y"
    assert s.state is State.READY and s2.state is State.READY


@pytest.mark.parametrize("name", ["READY", "SUBSCRIBED", "UNSUBSCRIBED"])
def test_reserved_event_name_is_error_4403(name: str) -> None:
    s = ready(pub=["*"], pub_rate=0)
    (err,) = sent(pub(s, t=name, nonce="r"))
    assert err["d"]["code"] == Err.FORBIDDEN and err["d"]["nonce"] == "r"
    assert s.state is State.READY


@pytest.mark.parametrize("name", ["lower", "message_create", "Mixed", "", "A" * 65, "A-B", "É"])
def test_bad_event_name_is_error_4422(name: str) -> None:
    """Protocol 1.1: a string ``t`` outside the grammar is a failed command
    (ERROR 4422 with the nonce and guild), it takes no token, and the
    connection stays; 1.0 closed with 4002."""
    s = ready(pub=["*"], pub_rate=1)
    (err,) = sent(pub(s, t=name, nonce="bad"))
    assert err["op"] == Op.ERROR
    assert err["d"]["code"] == Err.INVALID_EVENT_NAME == 4422
    assert err["d"]["nonce"] == "bad" and err["d"]["g"] == "g-1"
    assert "[A-Z0-9_]" in err["d"]["message"]
    assert s.state is State.READY and s.pending_publishes == 0
    # The one token of a pub_rate of 1 is still there for a valid name.
    (p,) = pub(s, nonce="good")
    assert isinstance(p, Publish)


def test_bad_event_name_answer_waits_its_turn() -> None:
    s = ready(pub=["*"], pub_rate=0)
    (p1,) = pub(s, nonce="a")
    assert isinstance(p1, Publish)
    assert pub(s, t="lower", nonce="b") == []  # 4422, queued behind p1
    out = sent(s.publish_done(p1, "g-1", 1, "e"))
    assert [(m["op"], m["d"]["nonce"]) for m in out] == [(Op.ACK, "a"), (Op.ERROR, "b")]


def test_publish_carries_its_idempotency_key() -> None:
    """Protocol 1.1: ``idempotency_key`` rides in the Publish effect; null is no key."""
    s = ready(pub=["*"], pub_rate=0)
    (p,) = pub(s, nonce="a", idempotency_key="order-7:paid")
    assert isinstance(p, Publish) and p.key == "order-7:paid" and p.nonce == "a"
    (q,) = pub(s, nonce="b", idempotency_key=None)
    assert isinstance(q, Publish) and q.key is None


@pytest.mark.parametrize("key", ["", "a b", "k" * 129, "é", "tab\t", 7, [], {}, True])
def test_bad_idempotency_key_is_error_4422(key: Any) -> None:
    """Protocol 1.1: a present key that is not one fails this PUBLISH (ERROR
    4422, nonce and guild), takes no token, and the connection stays."""
    s = ready(pub=["*"], pub_rate=1)
    (err,) = sent(pub(s, nonce="bad", idempotency_key=key))
    assert err["op"] == Op.ERROR and err["d"]["code"] == Err.INVALID_IDEMPOTENCY_KEY == 4422
    assert err["d"]["nonce"] == "bad" and err["d"]["g"] == "g-1"
    assert "idempotency_key" in err["d"]["message"]
    assert s.state is State.READY and s.pending_publishes == 0
    (p,) = pub(s, nonce="good", idempotency_key="k")  # the token is still there
    assert isinstance(p, Publish) and p.key == "k"


def test_ping_or_pong_extends_deadline_once_identified() -> None:
    """Protocol 1.1: a WebSocket ping/pong is a sign of life (the gateway
    calls ``alive``); before IDENTIFY it extends nothing."""
    s = new(Limits(heartbeat_interval_ms=1000, identify_timeout=10.0))
    s.alive(T0 + 5)
    assert s.deadline == T0 + 10.0
    s = ready(Limits(heartbeat_interval_ms=1000))
    s.alive(T0 + 1.0)
    assert s.check_timeout(T0 + 2.4) == []
    s.alive(T0 + 2.4)
    assert s.check_timeout(T0 + 3.8) == []
    assert close_code(s.check_timeout(T0 + 3.9 + 0.01)) == Close.SESSION_TIMEOUT


def test_payload_too_large_is_error_4413() -> None:
    s = ready(Limits(max_payload=200), pub=["*"], pub_rate=0)
    (p,) = pub(s, d="x" * 100)
    assert isinstance(p, Publish)
    s.publish_done(p, "g-1", 1, "e")
    (err,) = sent(pub(s, d="x" * 200, nonce="big"))
    assert err["d"]["code"] == Err.PAYLOAD_TOO_LARGE and err["d"]["nonce"] == "big"
    assert s.state is State.READY


def _accepted(effects: list[Effect]) -> bool:
    if len(effects) == 1 and isinstance(effects[0], Publish):
        return True
    assert [m["d"]["code"] for m in sent(effects)] == [Err.PUBLISH_RATE_LIMITED], effects
    return False


def _answer_all(s: Session, effects: list[Effect]) -> None:
    for e in effects:
        if isinstance(e, Publish):
            s.publish_done(e, e.gid, 1, "e")


def test_publish_token_bucket_burst_and_refill() -> None:
    s = ready(pub=["*"], pub_rate=4)
    results = []
    for _ in range(6):
        effects = pub(s, nonce="n")
        results.append(_accepted(effects))
        _answer_all(s, effects)
    assert results == [True, True, True, True, False, False]  # burst: one second's worth
    # Refilled at 4/s: a quarter second buys one event.
    effects = pub(s, T0 + 0.25)
    assert _accepted(effects)
    _answer_all(s, effects)
    assert not _accepted(pub(s, T0 + 0.25))
    # A long pause refills only up to the burst.
    results = []
    for _ in range(5):
        effects = pub(s, T0 + 100)
        results.append(_accepted(effects))
        _answer_all(s, effects)
    assert results == [True, True, True, True, False]
    assert s.state is State.READY


def test_rate_limited_publish_error_carries_nonce_and_guild() -> None:
    s = ready(pub=["*"], pub_rate=1)
    _answer_all(s, pub(s))
    (err,) = sent(pub(s, nonce="late", guild="g-9"))
    assert err["d"] == {
        "code": Err.PUBLISH_RATE_LIMITED,
        "message": err["d"]["message"],
        "nonce": "late",
        "g": "g-9",
    }


def test_publish_rate_defaults_to_server_setting_and_zero_is_unlimited() -> None:
    s = ready(Limits(publish_rate=2), pub=["*"])  # no pub_rate claim
    outcomes = []
    for _ in range(3):
        effects = pub(s)
        outcomes.append(_accepted(effects))
        _answer_all(s, effects)
    assert outcomes == [True, True, False]
    unlimited = ready(Limits(publish_rate=2), pub=["*"], pub_rate=0)
    for _ in range(1000):
        effects = pub(unlimited)
        assert _accepted(effects)
        _answer_all(unlimited, effects)
    server_unlimited = ready(Limits(publish_rate=0), pub=["*"])
    for _ in range(1000):
        effects = pub(server_unlimited)
        assert _accepted(effects)
        _answer_all(server_unlimited, effects)


def test_fractional_publish_rate_allows_one_event_per_period() -> None:
    # pub_rate 0.5: one event every two seconds, never none at all.
    s = ready(pub=["*"], pub_rate=0.5)
    effects = pub(s)
    assert _accepted(effects)
    _answer_all(s, effects)
    assert not _accepted(pub(s, T0 + 1.0))
    effects = pub(s, T0 + 2.0)
    assert _accepted(effects)


def test_acks_come_in_publish_order() -> None:
    s = ready(pub=["*"], pub_rate=0)
    ps = []
    for i in range(4):
        (p,) = pub(s, nonce=f"n{i}")
        assert isinstance(p, Publish)
        ps.append(p)
    assert s.publish_done(ps[2], "g-1", 3, "e") == []
    assert s.publish_done(ps[1], "g-1", 2, "e") == []
    first = sent(s.publish_done(ps[0], "g-1", 1, "e"))
    assert [m["d"]["nonce"] for m in first] == ["n0", "n1", "n2"]
    assert [m["d"]["s"] for m in first] == [1, 2, 3]
    assert [m["d"]["nonce"] for m in sent(s.publish_done(ps[3], "g-1", 4, "e"))] == ["n3"]
    assert s.pending_publishes == 0


def test_forbidden_effects_name_the_guild_for_the_hosts_log() -> None:
    s = ready(guilds=["ok"], pub=["ok"], pub_rate=0)
    sub = s.receive(msg(Op.SUBSCRIBE, {"guilds": {"no": None}}), T0)
    assert [e for e in sub if isinstance(e, Forbidden)] == [Forbidden("no", "guild not allowed")]
    out = pub(s, guild="no", nonce="x")
    assert out[0] == Forbidden("no", "publishing to this guild not allowed")
    assert [m["d"]["code"] for m in sent(out)] == [Err.FORBIDDEN]
    reserved = pub(s, guild="ok", t="READY")
    assert reserved[0] == Forbidden("ok", "READY is a reserved event name")
    # Other refusals are not security events.
    (p,) = pub(s, guild="ok")
    assert isinstance(p, Publish)
    assert not [
        e for e in s.publish_failed(p, Err.TRY_AGAIN_LATER, "busy") if isinstance(e, Forbidden)
    ]


def test_publishes_awaiting_an_answer_are_bounded() -> None:
    s = ready(pub=["ok"], pub_rate=0, limits=Limits(max_pending_publishes=3))
    (p1,) = pub(s, guild="ok")
    assert isinstance(p1, Publish)
    # Refusals queue behind the unanswered first PUBLISH...
    pub(s, guild="no")
    pub(s, guild="no")
    assert s.pending_publishes == 3
    # ...up to the bound; one more closes the connection.
    assert close_code(pub(s, guild="no")) == Close.RATE_LIMITED
    assert s.state is State.CLOSED


def test_subscribe_refusals_wait_behind_pending_publishes() -> None:
    """PROTOCOL.md "Publishing": answers in command order, a SUBSCRIBE's
    ERROR included (the session's own 4403 and the host's 1013)."""
    s = ready(pub=["ok"], pub_rate=0, guilds=["ok", "busy"])
    (p1,) = pub(s, guild="ok", nonce="a")
    assert isinstance(p1, Publish)
    out = s.receive(msg(Op.SUBSCRIBE, {"guilds": {"no": None, "busy": None}}), T0)
    assert out == [Forbidden("no", "guild not allowed"), Subscribe("busy", None)]
    assert s.subscribe_failed("busy", Err.TRY_AGAIN_LATER, "too many guilds") == []
    assert "busy" not in s.subscriptions
    answers = sent(s.publish_done(p1, "ok", 1, "e"))
    assert [(m["op"], m["d"].get("nonce"), m["d"].get("g")) for m in answers] == [
        (Op.ACK, "a", "ok"),
        (Op.ERROR, None, "no"),
        (Op.ERROR, None, "busy"),
    ]
    assert [m["d"]["code"] for m in answers[1:]] == [Err.FORBIDDEN, Err.TRY_AGAIN_LATER]
    # With nothing pending a refusal is answered at once.
    assert [m["d"]["code"] for m in sent(s.subscribe_failed("busy", 1013, "x"))] == [1013]


def test_subscribe_refusals_queued_count_against_the_bound() -> None:
    s = ready(pub=["ok"], pub_rate=0, guilds=["ok"], limits=Limits(max_pending_publishes=2))
    (p1,) = pub(s, guild="ok")
    assert isinstance(p1, Publish)
    assert s.receive(msg(Op.SUBSCRIBE, {"guilds": {"no": None}}), T0) == [
        Forbidden("no", "guild not allowed")
    ]
    assert s.pending_publishes == 2
    # The close is the only effect: no Forbidden, no Subscribe beside it.
    out = s.receive(msg(Op.SUBSCRIBE, {"guilds": {"ok": None, "no2": None}}), T0)
    assert_closed_with(s, out, Close.RATE_LIMITED)
    # "ok" got no Subscribe effect, so the session does not count it either.
    assert s.subscriptions == set()


def test_a_4008_midway_keeps_the_guilds_subscribed_before() -> None:
    s = ready(pub=["ok"], pub_rate=0, guilds=["a", "b"], limits=Limits(max_pending_publishes=1))
    assert s.receive(msg(Op.SUBSCRIBE, {"guilds": {"a": None}}), T0) == [Subscribe("a", None)]
    (p1,) = pub(s, guild="ok")
    assert isinstance(p1, Publish)
    out = s.receive(msg(Op.SUBSCRIBE, {"guilds": {"a": None, "b": None, "no": None}}), T0)
    assert_closed_with(s, out, Close.RATE_LIMITED)
    # "a" was subscribed by an earlier command and stays; "b" never was.
    assert s.subscriptions == {"a"}


def test_answered_publishes_free_their_place_in_the_bound() -> None:
    s = ready(pub=["ok"], pub_rate=0, limits=Limits(max_pending_publishes=2))
    for i in range(10):
        (p,) = pub(s, guild="ok", nonce=str(i))
        assert isinstance(p, Publish)
        assert [m["d"]["s"] for m in sent(s.publish_done(p, "ok", i + 1, "e"))] == [i + 1]
    assert s.pending_publishes == 0


def test_errors_wait_their_turn_behind_pending_publishes() -> None:
    s = ready(pub=["ok"], pub_rate=0)
    (p1,) = pub(s, guild="ok", nonce="a")
    assert isinstance(p1, Publish)
    # Rejected (and reported to the host) at once, but answered only after
    # the PUBLISH sent before it.
    assert pub(s, guild="forbidden", nonce="b") == [
        Forbidden("forbidden", "publishing to this guild not allowed")
    ]
    (p3,) = pub(s, guild="ok", nonce="c")
    assert isinstance(p3, Publish)
    assert s.publish_failed(p3, Err.TRY_AGAIN_LATER, "busy") == []
    out = sent(s.publish_done(p1, "ok", 1, "e"))
    assert [(m["op"], m["d"]["nonce"]) for m in out] == [
        (Op.ACK, "a"),
        (Op.ERROR, "b"),
        (Op.ERROR, "c"),
    ]
    assert [m["d"].get("code") for m in out] == [None, Err.FORBIDDEN, Err.TRY_AGAIN_LATER]


def test_a_refused_publish_waiting_its_turn_keeps_only_its_answer() -> None:
    s = ready(pub=["ok"], pub_rate=0, limits=Limits(max_payload=64))
    (p1,) = pub(s, guild="ok", nonce="a")
    assert isinstance(p1, Publish)
    assert pub(s, guild="ok", nonce="b", d="x" * 200) == []  # 4413, queued behind p1
    assert s._pending is not None
    waiting = s._pending[-1]
    assert waiting.answer is not None and waiting.d is None
    out = sent(s.publish_done(p1, "ok", 1, "e"))
    assert [m["d"].get("code") for m in out] == [None, Err.PAYLOAD_TOO_LARGE]


# --- rewind (protocol 1.1, PROTOCOL.md "Rewind") ----------------------------------


def test_rewind_in_identify_and_subscribe_becomes_the_effect() -> None:
    s = new()
    guilds = {"a": {"rewind": 5}, "b": None, "c": {"epoch": "e", "s": 2}}
    effects = s.receive(msg(Op.IDENTIFY, {"token": token(guilds=["*"]), "guilds": guilds}), T0)
    assert [e for e in effects if isinstance(e, Subscribe)] == [
        Subscribe("a", None, 5),
        Subscribe("b", None),
        Subscribe("c", ("e", 2)),
    ]
    # A huge rewind is no error: the guild caps it at max_rewind.
    big = b'{"op":3,"d":{"guilds":{"d":{"rewind":1000000000000000000000000000000}}}}'
    assert s.receive(big, T0) == [Subscribe("d", None, 10**30)]


@pytest.mark.parametrize(
    "value",
    [
        {"rewind": 0},
        {"rewind": -1},
        {"rewind": 1.5},
        {"rewind": "3"},
        {"rewind": True},
        {"rewind": None},
        {"rewind": 3, "epoch": "e", "s": 1},
        {"rewind": 3, "s": 1},
    ],
    ids=repr,
)
def test_bad_rewind_is_a_decode_error(value: Any) -> None:
    s = ready()
    effects = s.receive(msg(Op.SUBSCRIBE, {"guilds": {"g": value}}), T0)
    assert_closed_with(s, effects, Close.DECODE_ERROR)
    s = new()
    effects = s.receive(msg(Op.IDENTIFY, {"token": token(), "guilds": {"g": value}}), T0)
    assert_closed_with(s, effects, Close.DECODE_ERROR)


# --- passive with the other options (PROTOCOL.md "Messages", the request table) ---


def test_passive_requests_become_the_effect_beside_rewinds() -> None:
    s = new()
    guilds = {
        "a": {"passive": True},
        "b": {"epoch": "e", "s": 4, "passive": True},
        "c": {"rewind": 3, "passive": False},
        "d": {"epoch": "e", "s": 1, "passive": False},
    }
    effects = s.receive(msg(Op.IDENTIFY, {"token": token(guilds=["*"]), "guilds": guilds}), T0)
    assert [e for e in effects if isinstance(e, Subscribe)] == [
        Subscribe("a", None, passive=True),
        Subscribe("b", ("e", 4), passive=True),
        Subscribe("c", None, 3),
        Subscribe("d", ("e", 1)),
    ]


@pytest.mark.parametrize(
    "value",
    [{"rewind": 3, "passive": True}, {"rewind": 3, "epoch": "e", "s": 1, "passive": True}],
    ids=repr,
)
def test_passive_with_a_rewind_is_a_decode_error(value: Any) -> None:
    s = ready()
    effects = s.receive(msg(Op.SUBSCRIBE, {"guilds": {"g": value}}), T0)
    assert_closed_with(s, effects, Close.DECODE_ERROR)
    s = new()
    effects = s.receive(msg(Op.IDENTIFY, {"token": token(), "guilds": {"g": value}}), T0)
    assert_closed_with(s, effects, Close.DECODE_ERROR)
