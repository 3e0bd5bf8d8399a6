"""A hypothesis state machine against the Sans-I/O gateway session.

Random sequences of valid and invalid inputs (IDENTIFY with good and bad
tokens, SUBSCRIBE/UNSUBSCRIBE of allowed, forbidden and malformed guilds and
positions, PUBLISH allowed/forbidden/oversized/reserved/over the rate, the
host's ``publish_done``/``publish_failed`` answers in random order,
HEARTBEAT, binary frames, garbage JSON, time passing, the sweeper's
``check_timeout`` and the transport going away) are fed to
:class:`server.protocol.session.Session` and to a model written from
PROTOCOL.md and docs/PROTOCOL.md. After every step:

- no exception escaped (hypothesis fails the run on one);
- every effect is the model's, in the model's order: each close is a
  PROTOCOL.md close code and the session's only and last effect, each ERROR
  carries a documented code, each frame is a valid server text frame;
- the state matches: identified or not, subscriptions are what was
  subscribed minus what was unsubscribed and never more than
  ``max_subscriptions``, the deadline, the pending PUBLISH count; CLOSED
  absorbs everything; ACKs and ERRORs of PUBLISHes come out in PUBLISH order,
  each exactly once, and a SUBSCRIBE's refusals after the answers of the
  PUBLISHes sent before it (command order).

Bounded: ``max_examples=200`` runs of at most 50 steps (a few seconds).
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any

import orjson
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from guildcast.core.tokens import TokenVerifier, make_token
from guildcast.protocol.codes import RESERVED_EVENTS, Close, Err, Op
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
from tests.protocol.framing import unframe

SECRET = "machine-secret-7d1e-0123456789abcdef0123"
T0 = 1000.0
LIMITS = Limits(
    heartbeat_interval_ms=10_000,
    identify_timeout=5.0,
    command_limit=12,
    command_window=60.0,
    publish_rate=3.0,
    max_payload=400,
    max_subscriptions=4,
)
CLOSE_CODES = {int(c) for c in Close}
ERROR_CODES = {int(c) for c in Err}


@dataclass(frozen=True)
class Tok:
    """A token and what the model expects of it (None: authentication fails)."""

    token: str
    user: str | None = None
    guilds: tuple[str, ...] = ()
    pub: tuple[str, ...] = ()
    rate: float = 0.0


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _unsigned(claims: dict[str, Any]) -> str:
    return f"{_b64(json.dumps({'alg': 'none'}).encode())}.{_b64(json.dumps(claims).encode())}."


TOKENS = {
    "alice": Tok(
        make_token(SECRET, "alice", guilds=["g-*", "open"], pub=["g-1*", "open"], pub_rate=2.0),
        "alice",
        ("g-*", "open"),
        ("g-1*", "open"),
        2.0,
    ),
    "bob": Tok(
        make_token(SECRET, "bob", guilds=["*"], pub=["*"], pub_rate=0), "bob", ("*",), ("*",)
    ),
    # No pub claim: publishes nowhere; no pub_rate: the server's default.
    "carol": Tok(make_token(SECRET, "carol", guilds=["g-1"]), "carol", ("g-1",), (), 3.0),
    # A rate below one event per second still allows one event per period.
    "dave": Tok(
        make_token(SECRET, "dave", guilds=["*"], pub=["*"], pub_rate=0.5),
        "dave",
        ("*",),
        ("*",),
        0.5,
    ),
    # The server's default rate (Limits.publish_rate) and every guild.
    "erin": Tok(make_token(SECRET, "erin", guilds=["*"], pub=["*"]), "erin", ("*",), ("*",), 3.0),
    "expired": Tok(make_token(SECRET, "eve", ttl=-30)),
    "other secret": Tok(make_token("another-secret-0123456789abcdef01234567", "eve")),
    "alg none": Tok(_unsigned({"sub": "eve", "guilds": ["*"]})),
    "garbage": Tok("not.a.jwt"),
    "empty": Tok(""),
}

GOOD_TOKENS = sorted(k for k, v in TOKENS.items() if v.user is not None)
BAD_TOKENS = sorted(k for k, v in TOKENS.items() if v.user is None)

GUILDS = ["g-1", "g-2", "g-10", "g-1x", "open", "other", "..", "a.b:c_d-e", "x" * 128]
POSITIONS: list[dict[str, Any] | None] = [
    None,
    {"epoch": "e1", "s": 0},
    {"epoch": "z" * 64, "s": 2**53},
]
#: Valid names weighted up (sampled_from draws uniformly): most PUBLISHes pass.
EVENTS = ["MSG", "MSG", "MSG", "A_1", "A_1", "X" * 64, *sorted(RESERVED_EVENTS)]
#: Strings outside the event-name grammar: ERROR 4422 since protocol 1.1
#: (PROTOCOL.md "Messages"), no longer a close.
EVENTS += ["msg", "Mixed", "X" * 65, ""]
#: Invalid guild ids (PROTOCOL.md "Envelope"): each closes with 4002.
BAD_GUILDS: list[Any] = ["", "x" * 129, "a/b", "../etc", "nul\x00", "sp ace", "é", 5, None]
BAD_POSITIONS: list[Any] = [
    {"epoch": "e", "s": -1},
    {"epoch": "e", "s": "1"},
    {"epoch": "e", "s": True},
    {"epoch": "e" * 65, "s": 1},
    {"epoch": 1, "s": 1},
    {"s": 1},
    [1, 2],
    "e:1",
]


def _match(patterns: tuple[str, ...], gid: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(gid, p) for p in patterns)


def norm(effects: list[Effect]) -> list[tuple[Any, ...]]:
    """Effects as comparable tuples; Send frames decoded (and checked as frames)."""
    out: list[tuple[Any, ...]] = []
    for e in effects:
        if isinstance(e, Send):
            for m in unframe(e.data):
                op, d = m["op"], m.get("d")
                if op == Op.ERROR:
                    out.append(("error", d["code"], d.get("g"), d.get("nonce")))
                elif op == Op.ACK:
                    out.append(("ack", d["g"], d["s"], d["epoch"], d.get("nonce")))
                elif op == Op.HEARTBEAT_ACK:
                    out.append(("hback",))
                elif op == Op.DISPATCH and m.get("t") == "READY":
                    out.append(("ready", d["user"]))
                elif op == Op.DISPATCH and m.get("t") == "UNSUBSCRIBED":
                    out.append(("unsubscribed", m["g"]))
                else:
                    out.append(("other", m))
        elif isinstance(e, CloseConn):
            out.append(("close", e.code))
        elif isinstance(e, Subscribe):
            out.append(("sub", e.gid, e.position))
        elif isinstance(e, Unsubscribe):
            out.append(("unsub", e.gid))
        elif isinstance(e, Publish):
            out.append(("pub", e.gid, e.t, e.nonce))
        elif isinstance(e, Forbidden):
            out.append(("forbidden", e.gid))
        else:
            out.append(("unknown", e))
    return out


class _Entry:
    """One PUBLISH waiting for its answer, in the model."""

    __slots__ = ("answer", "gid", "nonce")

    def __init__(self, gid: str, nonce: str | None) -> None:
        self.gid = gid
        self.nonce = nonce
        self.answer: tuple[Any, ...] | None = None


class SessionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.verifier = TokenVerifier(SECRET)
        self.now = T0
        self.s = Session(self.verifier, LIMITS, "sess", self.now)
        # --- the model -----------------------------------------------------------
        self.state = State.AWAIT_IDENTIFY
        self.deadline = T0 + LIMITS.identify_timeout
        self.cmd_start = 0.0
        self.cmd_count = 0
        self.subs: set[str] = set()
        self.tok: Tok | None = None
        self.bucket = 0.0
        self.bucket_at = T0
        self.pending: list[_Entry] = []
        #: Publish effects the host has not answered yet, with their model entry.
        self.outstanding: list[tuple[Publish, _Entry]] = []
        self.seq = 0
        self.nonces = 0
        self.steps = 0
        self.hostile_after = 0
        #: Steps taken since the session closed (a few show CLOSED absorbs them).
        self.closed_steps = 0

    @initialize(hostile_after=st.integers(0, 60))
    def hello(self, hostile_after: int) -> None:
        # Hostile input closes the session at once; a random prefix of
        # well-formed steps lets runs reach deep states (full subscriptions,
        # many PUBLISHes in flight, an empty bucket) before it may come.
        self.hostile_after = hostile_after
        (m,) = unframe(self.s.hello())
        assert m == {"op": Op.HELLO, "d": {"heartbeat_interval": 10_000}}

    # --- preconditions -------------------------------------------------------------

    def open_or_recent(self) -> bool:
        return self.state is not State.CLOSED or self.closed_steps < 5

    def hostile(self) -> bool:
        """Input that closes the session may come now."""
        return self.steps >= self.hostile_after and self.open_or_recent()

    def may(self, state: State) -> bool:
        """A well-formed command for ``state``, or (hostile) one in another state."""
        return self.state is state or self.hostile()

    # --- model helpers -------------------------------------------------------------

    def step(self, effects: list[Effect], expected: list[tuple[Any, ...]]) -> None:
        """Compare one step's effects with the model's and check their form."""
        self.steps += 1
        if self.state is State.CLOSED:
            self.closed_steps += 1
        got = norm(effects)
        assert got == expected, f"\n got      {got}\n expected {expected}"
        for e in effects:
            if isinstance(e, CloseConn):
                assert e.code in CLOSE_CODES, e
                assert len(effects) == 1, effects
        for item in got:
            if item[0] == "error":
                assert item[1] in ERROR_CODES, item

    def malformed_after_identify(self) -> list[tuple[Any, ...]]:
        """The model's answer to a malformed SUBSCRIBE or UNSUBSCRIBE (``{}``,
        no guilds at all, included): 4003 before IDENTIFY, else 4002, or
        4008 when it is one command too many."""
        if self.state is State.CLOSED:
            return []
        if self.state is State.AWAIT_IDENTIFY:
            return self.close(Close.NOT_IDENTIFIED)
        self.alive()
        return self.close(Close.RATE_LIMITED if self.count() else Close.DECODE_ERROR)

    def close(self, code: int) -> list[tuple[Any, ...]]:
        self.state = State.CLOSED
        self.pending.clear()
        return [("close", code)]

    def alive(self) -> None:
        """Any message with a client opcode, once identified, extends the deadline."""
        if self.state is State.READY:
            self.deadline = self.now + LIMITS.heartbeat_interval_ms * 1.5 / 1000.0

    def count(self) -> bool:
        """Count a command; True if it is over the limit (close 4008)."""
        if self.now - self.cmd_start >= LIMITS.command_window:
            self.cmd_start = self.now
            self.cmd_count = 0
        self.cmd_count += 1
        return self.cmd_count > LIMITS.command_limit

    def subscribe_model(self, guilds: dict[str, Any]) -> list[tuple[Any, ...]]:
        assert self.tok is not None
        out: list[tuple[Any, ...]] = []
        for gid, pos in guilds.items():
            if not _match(self.tok.guilds, gid):
                out.append(("forbidden", gid))
                out += self.refuse(Err.FORBIDDEN, gid)
            elif gid not in self.subs and len(self.subs) >= LIMITS.max_subscriptions:
                out += self.refuse(Err.TOO_MANY_SUBSCRIPTIONS, gid)
            else:
                self.subs.add(gid)
                out.append(("sub", gid, None if pos is None else (pos["epoch"], pos["s"])))
        return out

    def refuse(self, code: int, gid: str) -> list[tuple[Any, ...]]:
        """A SUBSCRIBE's ERROR: at once, or behind the PUBLISHes still
        awaiting their answer (answers in command order)."""
        if not self.pending:
            return [("error", code, gid, None)]
        entry = _Entry(gid, None)
        entry.answer = ("error", code, gid, None)
        self.pending.append(entry)
        return []

    def flush(self) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        if self.state is State.CLOSED:
            return out
        while self.pending and self.pending[0].answer is not None:
            out.append(self.pending.pop(0).answer)  # type: ignore[arg-type]
        return out

    def send(self, obj: Any) -> list[Effect]:
        return self.s.receive(obj if isinstance(obj, bytes) else orjson.dumps(obj), self.now)

    # --- valid commands --------------------------------------------------------------

    @precondition(lambda self: self.may(State.AWAIT_IDENTIFY))
    @rule(
        name=st.sampled_from(GOOD_TOKENS),
        guilds=st.dictionaries(st.sampled_from(GUILDS), st.sampled_from(POSITIONS), max_size=6),
        events=st.none() | st.lists(st.sampled_from(["MSG", "A_1"]), max_size=2),
        presence=st.booleans(),
    )
    def identify(
        self, name: str, guilds: dict[str, Any], events: list[str] | None, presence: bool
    ) -> None:
        tok = TOKENS[name]
        d: dict[str, Any] = {"token": tok.token, "guilds": guilds, "presence": presence}
        if events is not None:
            d["events"] = events
        effects = self.send({"op": Op.IDENTIFY, "d": d})
        if self.state is State.CLOSED:
            expected: list[tuple[Any, ...]] = []
        elif self.state is State.READY:
            self.alive()
            expected = self.close(Close.ALREADY_IDENTIFIED)
        elif self.count():
            expected = self.close(Close.RATE_LIMITED)
        elif tok.user is None:
            expected = self.close(Close.AUTH_FAILED)
        else:
            self.state = State.READY
            self.tok = tok
            self.deadline = self.now + LIMITS.heartbeat_interval_ms * 1.5 / 1000.0
            self.bucket = max(tok.rate, 1.0)
            self.bucket_at = self.now
            expected = [("ready", tok.user), *self.subscribe_model(guilds)]
        self.step(effects, expected)
        if tok.user is not None and self.state is State.READY:
            assert self.s.events == (None if events is None else frozenset(events))
            assert self.s.presence is presence

    @precondition(lambda self: self.may(State.READY))
    @rule(guilds=st.dictionaries(st.sampled_from(GUILDS), st.sampled_from(POSITIONS), max_size=6))
    def subscribe(self, guilds: dict[str, Any]) -> None:
        effects = self.send({"op": Op.SUBSCRIBE, "d": {"guilds": guilds}})
        if self.state is State.CLOSED:
            expected: list[tuple[Any, ...]] = []
        elif self.state is State.AWAIT_IDENTIFY:
            expected = self.close(Close.NOT_IDENTIFIED)
        else:
            self.alive()
            expected = (
                self.close(Close.RATE_LIMITED) if self.count() else self.subscribe_model(guilds)
            )
        self.step(effects, expected)

    @precondition(lambda self: self.may(State.READY))
    @rule(gids=st.lists(st.sampled_from(GUILDS), max_size=5))
    def unsubscribe(self, gids: list[str]) -> None:
        effects = self.send({"op": Op.UNSUBSCRIBE, "d": {"guilds": gids}})
        expected: list[tuple[Any, ...]] = []
        if self.state is State.AWAIT_IDENTIFY:
            expected = self.close(Close.NOT_IDENTIFIED)
        elif self.state is State.READY:
            self.alive()
            if self.count():
                expected = self.close(Close.RATE_LIMITED)
            else:
                for gid in dict.fromkeys(gids):
                    if gid in self.subs:
                        self.subs.discard(gid)
                        expected.append(("unsub", gid))
                    else:
                        expected.append(("unsubscribed", gid))
        self.step(effects, expected)

    @precondition(lambda self: self.may(State.READY))
    @rule(
        gid=st.sampled_from(GUILDS),
        t=st.sampled_from(EVENTS),
        pad=st.sampled_from([0, 0, 10, 10, 100, 300, 380, 1000]),
        nonce_kind=st.sampled_from(["none", "short", "short", "max"]),
    )
    def publish(self, gid: str, t: str, pad: int, nonce_kind: str) -> None:
        self.nonces += 1
        nonce = {"none": None, "short": f"n{self.nonces}", "max": f"{self.nonces:0128d}"}[
            nonce_kind
        ]
        body: dict[str, Any] = {"guild": gid, "t": t, "d": {"pad": "x" * pad}}
        if nonce is not None:
            body["nonce"] = nonce
        data = orjson.dumps({"op": Op.PUBLISH, "d": body})
        effects = self.send(data)
        expected: list[tuple[Any, ...]] = []
        if self.state is State.AWAIT_IDENTIFY:
            expected = self.close(Close.NOT_IDENTIFIED)
        elif self.state is State.READY:
            assert self.tok is not None
            self.alive()
            entry = _Entry(gid, nonce)
            self.pending.append(entry)
            code: int | None = None
            if re.fullmatch("[A-Z0-9_]{1,64}", t) is None:
                code = Err.INVALID_EVENT_NAME
            elif t in RESERVED_EVENTS or not _match(self.tok.pub, gid):
                code = Err.FORBIDDEN
            elif len(data) > LIMITS.max_payload:
                code = Err.PAYLOAD_TOO_LARGE
            elif self.tok.rate > 0:
                rate = self.tok.rate
                self.bucket = min(max(rate, 1.0), self.bucket + (self.now - self.bucket_at) * rate)
                self.bucket_at = self.now
                if self.bucket < 1.0:
                    code = Err.PUBLISH_RATE_LIMITED
                else:
                    self.bucket -= 1.0
            if code is not None:
                entry.answer = ("error", code, gid, nonce)
                # A 4403 is reported to the host at once, whenever it is answered.
                expected = [("forbidden", gid)] if code == Err.FORBIDDEN else []
                expected += self.flush()
            else:
                expected = [("pub", gid, t, nonce)]
                (p,) = [e for e in effects if isinstance(e, Publish)] or [None]
                if p is not None:
                    assert p.d == {"pad": "x" * pad}
                    self.outstanding.append((p, entry))
        self.step(effects, expected)

    @precondition(lambda self: bool(self.outstanding))
    @rule(data=st.data(), ok=st.booleans(), code=st.sampled_from([Err.TRY_AGAIN_LATER, 4002]))
    def answer(self, data: st.DataObject, ok: bool, code: int) -> None:
        """The host answers one outstanding PUBLISH, in any order."""
        i = data.draw(st.integers(0, len(self.outstanding) - 1), label="which")
        p, entry = self.outstanding.pop(i)
        if ok:
            self.seq += 1
            effects = self.s.publish_done(p, p.gid, self.seq, "ep")
            entry.answer = ("ack", p.gid, self.seq, "ep", entry.nonce)
        else:
            effects = self.s.publish_failed(p, code, "host said no")
            entry.answer = ("error", code, p.gid, entry.nonce)
        self.step(effects, self.flush())

    @precondition(lambda self: self.hostile())
    @rule(name=st.sampled_from(BAD_TOKENS), guilds=st.sampled_from([{}, {"g-1": None}]))
    def bad_token(self, name: str, guilds: dict[str, Any]) -> None:
        effects = self.send(
            {"op": Op.IDENTIFY, "d": {"token": TOKENS[name].token, "guilds": guilds}}
        )
        if self.state is State.CLOSED:
            expected: list[tuple[Any, ...]] = []
        elif self.state is State.READY:
            self.alive()
            expected = self.close(Close.ALREADY_IDENTIFIED)
        else:
            expected = self.close(Close.RATE_LIMITED if self.count() else Close.AUTH_FAILED)
        self.step(effects, expected)
        assert self.s.grant is None or self.state is State.CLOSED

    @precondition(lambda self: self.open_or_recent())
    @rule()
    def heartbeat(self) -> None:
        effects = self.send({"op": Op.HEARTBEAT, "d": None})
        if self.state is State.CLOSED:
            self.step(effects, [])
        else:
            self.alive()
            self.step(effects, [("hback",)])

    # --- invalid input -----------------------------------------------------------------

    @precondition(lambda self: self.hostile())
    @rule(
        data=st.sampled_from(
            [
                b"",
                b"not json",
                b"{",
                b"\xff\xfe{}",
                b'{"op": 1, "d": "\xed\xa0\x80"}',  # a UTF-8 surrogate
                b"[" * 2000,
                b'{"op": 1e400}',
                b"[]",
                b'"op"',
                b"42",
                b"null",
                b'{"d": null}',
                b'{"op": "1"}',
                b'{"op": 1.0}',
                b'{"op": true}',
                b'{"op": null}',
                b'{"op": [1]}',
            ]
        )
    )
    def garbage(self, data: bytes) -> None:
        effects = self.s.receive(data, self.now)
        self.step(effects, [] if self.state is State.CLOSED else self.close(Close.DECODE_ERROR))

    @precondition(lambda self: self.hostile())
    @rule(op=st.sampled_from([0, 6, 7, 8, 10, 11, 12, 13, 99, -1, 2**40, 2**64 - 1]))
    def unknown_op(self, op: int) -> None:
        effects = self.send({"op": op, "d": None})
        self.step(effects, [] if self.state is State.CLOSED else self.close(Close.UNKNOWN_OPCODE))

    @precondition(lambda self: self.hostile())
    @rule()
    def binary(self) -> None:
        effects = self.s.receive_binary()
        self.step(effects, [] if self.state is State.CLOSED else self.close(Close.DECODE_ERROR))

    @precondition(lambda self: self.hostile())
    @rule(
        d=st.sampled_from(
            [
                None,
                [],
                "guilds",
                {"guilds": None},
                {"guilds": []},
                *({"guilds": {"g-1": p}} for p in BAD_POSITIONS),
            ]
        )
        | st.sampled_from(BAD_GUILDS).map(lambda g: {"guilds": {g: None}} if type(g) is str else {})
    )
    def bad_subscribe(self, d: Any) -> None:
        effects = self.send({"op": Op.SUBSCRIBE, "d": d})
        expected = self.malformed_after_identify()
        self.step(effects, expected)

    @precondition(lambda self: self.hostile())
    @rule(
        d=st.sampled_from([None, {}, {"guilds": "g-1"}, {"guilds": {"g-1": None}}])
        | st.sampled_from(BAD_GUILDS).map(lambda g: {"guilds": ["g-1", g]})
    )
    def bad_unsubscribe(self, d: Any) -> None:
        effects = self.send({"op": Op.UNSUBSCRIBE, "d": d})
        expected = self.malformed_after_identify()
        self.step(effects, expected)

    @precondition(lambda self: self.hostile())
    @rule(
        d=st.sampled_from(
            [
                None,
                "publish",
                {"t": "MSG", "d": 1},
                {"guild": "g-1", "d": 1},
                {"guild": "g-1", "t": 7},
                {"guild": "g-1", "t": ["MSG"]},
                {"guild": "g-1", "t": "MSG", "nonce": 5},
                {"guild": "g-1", "t": "MSG", "nonce": "n" * 129},
                {"guild": "g-1", "t": "MSG", "nonce": ["n"]},
            ]
        )
        | st.sampled_from(BAD_GUILDS).map(lambda g: {"guild": g, "t": "MSG", "d": None})
    )
    def bad_publish(self, d: Any) -> None:
        effects = self.send({"op": Op.PUBLISH, "d": d})
        if self.state is State.CLOSED:
            expected: list[tuple[Any, ...]] = []
        elif self.state is State.AWAIT_IDENTIFY:
            expected = self.close(Close.NOT_IDENTIFIED)
        else:
            self.alive()  # no command count for PUBLISH
            expected = self.close(Close.DECODE_ERROR)
        self.step(effects, expected)

    @precondition(lambda self: self.hostile())
    @rule(
        d=st.sampled_from(
            [
                None,
                "token",
                {"guilds": {}},
                {"token": 5, "guilds": {}},
                {"token": TOKENS["bob"].token, "guilds": []},
                {"token": TOKENS["bob"].token, "guilds": {"a/b": None}},
                {"token": TOKENS["bob"].token, "guilds": {"g-1": {"s": -1, "epoch": "e"}}},
                {"token": TOKENS["bob"].token, "presence": "yes"},
                {"token": TOKENS["bob"].token, "events": "MSG"},
                {"token": TOKENS["bob"].token, "events": ["msg"]},
                {"token": TOKENS["bob"].token, "events": [1]},
            ]
        )
    )
    def bad_identify(self, d: Any) -> None:
        effects = self.send({"op": Op.IDENTIFY, "d": d})
        if self.state is State.CLOSED:
            expected: list[tuple[Any, ...]] = []
        elif self.state is State.READY:
            self.alive()
            expected = self.close(Close.ALREADY_IDENTIFIED)
        else:
            expected = self.close(Close.RATE_LIMITED if self.count() else Close.DECODE_ERROR)
        self.step(effects, expected)

    # --- time and the transport -----------------------------------------------------------

    # Mostly small steps; sometimes past a deadline or a command window.
    @rule(
        dt=st.sampled_from(
            [0.0, 0.001, 0.01, 0.2, 0.3, 0.5, 0.5, 1.0, 1.0, 3.0, 4.999, 6.0, 16.0, 61.0]
        )
    )
    def advance(self, dt: float) -> None:
        self.steps += 1
        self.now += dt

    @precondition(lambda self: self.open_or_recent())
    @rule()
    def sweep(self) -> None:
        effects = self.s.check_timeout(self.now)
        expected: list[tuple[Any, ...]] = []
        if self.state is not State.CLOSED and self.now >= self.deadline:
            code = (
                Close.NOT_IDENTIFIED
                if self.state is State.AWAIT_IDENTIFY
                else Close.SESSION_TIMEOUT
            )
            expected = self.close(code)
        self.step(effects, expected)

    @precondition(lambda self: self.hostile())
    @rule()
    def transport_gone(self) -> None:
        self.steps += 1
        self.s.closed()
        self.state = State.CLOSED
        self.pending.clear()

    # --- invariants ------------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        s = self.s
        assert s.state is self.state
        assert s.subscriptions == self.subs
        assert len(s.subscriptions) <= LIMITS.max_subscriptions
        if self.state is State.AWAIT_IDENTIFY:
            assert s.grant is None and not s.subscriptions
        if self.state is not State.CLOSED:
            assert s.deadline == self.deadline
            assert s.pending_publishes == len(self.pending)
            # Every pending entry but an answered head waits on the host.
            assert not self.pending or self.pending[0].answer is None
        if self.state is State.READY:
            assert s.grant is not None and self.tok is not None
            assert s.grant.sub == self.tok.user


TestSessionMachine = SessionMachine.TestCase
TestSessionMachine.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
