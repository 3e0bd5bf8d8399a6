"""The Sans-I/O client session (guildcast.protocol.client): messages in,
outputs out, no event loop, time passed in. The golden cases shared with the
JS client are in test_cases.py; the hypothesis state machine is at the end."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from guildcast.protocol import client as pc
from guildcast.protocol.client import ClientSession, Event, Position, Resync, State
from guildcast.protocol.codes import CloseAction

T0 = 1000.0
HELLO = {"op": 10, "d": {"heartbeat_interval": 1000}}
READY = {"op": 0, "t": "READY", "d": {"session_id": "s1", "user": "u"}}


def recv(s: ClientSession, obj: Any, now: float = T0) -> list[pc.Output]:
    return s.receive(orjson.dumps(obj), now)


def subscribed(gid: str, epoch: str, s: int, recovered: bool) -> dict[str, Any]:
    return {
        "op": 0,
        "t": "SUBSCRIBED",
        "g": gid,
        "d": {"epoch": epoch, "s": s, "recovered": recovered},
    }


def event(gid: str, s: int, t: str = "N", d: Any = None) -> dict[str, Any]:
    return {"op": 0, "t": t, "g": gid, "s": s, "d": d}


def ready(guilds: tuple[str, ...] = (), **kw: Any) -> ClientSession:
    s = ClientSession(guilds, **kw)
    s.connection_made("tok", T0)
    recv(s, HELLO)
    recv(s, READY)
    assert s.ready
    return s


def sends(outs: list[pc.Output]) -> list[dict[str, Any]]:
    return [orjson.loads(o.data) for o in outs if isinstance(o, pc.Send)]


def test_hello_timeout_and_wrong_first_message_close_4000() -> None:
    s = ClientSession()
    s.connection_made("tok", T0)
    assert s.next_tick == T0 + pc.DEFAULT_HELLO_TIMEOUT
    assert s.tick(T0 + 1) == []
    assert s.tick(s.next_tick) == [pc.CloseConn(4000, "no HELLO in time")]
    s.connection_made("tok", T0)
    (out,) = recv(s, READY)
    assert isinstance(out, pc.CloseConn) and (out.code, out.reason) == (4000, "expected HELLO")


SUB_B = {"op": 3, "d": {"guilds": {"b": None}}}


def test_subscribe_retry_delay_grows_from_the_floor_to_the_cap() -> None:
    half = iter([0.5] * 100).__next__
    # Full jitter (u = 0.5) over min(cap, base * 2**max(n, 2)).
    assert [pc.subscribe_retry_delay(n, None, 0.5, 30.0, half) for n in (0, 2, 3, 6, 9)] == [
        1.0,
        1.0,
        2.0,
        15.0,
        15.0,
    ]
    # A longer hint wins; a shorter one does not shorten the backoff.
    assert pc.subscribe_retry_delay(0, (3000, 5000), 0.5, 30.0, half) == 4.0
    assert pc.subscribe_retry_delay(0, (0, 100), 0.5, 30.0, half) == 1.0


def test_a_guild_refused_with_1013_is_asked_again_until_subscribed() -> None:
    s = ready(retry_base=0.5, retry_cap=30.0, random=lambda: 0.5)
    assert sends(s.subscribe("b")) == [{"op": 3, "d": {"guilds": {"b": None}}}]
    busy = {"op": 13, "d": {"code": 1013, "message": "busy", "g": "b"}}
    delays = []
    for n in range(4):
        (out,) = recv(s, busy, T0 + n)
        assert isinstance(out, pc.SubscribeDeferred) and out.guild == "b"
        delays.append(out.delay)
        due = T0 + n + out.delay
        assert s.follows("b") and s.next_tick <= due
        assert SUB_B not in sends(s.tick(due - 0.01))
        assert SUB_B in sends(s.tick(due))  # (with the heartbeat falling due too)
    # The guild's refusals in a row: the floor's window (2 s) first, then doubling.
    assert delays == [1.0, 1.0, 1.0, 2.0]
    recv(s, subscribed("b", "e", 0, False))
    (out,) = recv(s, busy)  # a 1013 for a guild already subscribed answers nothing pending
    assert isinstance(out, pc.ServerError)
    # Left while waiting: never asked again.
    s.subscribe("c")
    recv(s, {"op": 13, "d": {"code": 1013, "message": "busy", "g": "c"}}, T0 + 5)
    assert s.unsubscribe("c") == []
    assert sends(s.tick(T0 + 9)) == [{"op": 1, "d": None}]  # the heartbeat only


@pytest.mark.parametrize(
    "bad",
    [
        b"not json",
        b"[1]",
        orjson.dumps({"op": 10, "d": {"heartbeat_interval": "x"}}),
        orjson.dumps({"op": 10, "d": {"heartbeat_interval": 0}}),
    ],
)
def test_bad_hello_closes(bad: bytes) -> None:
    s = ClientSession()
    s.connection_made("tok", T0)
    (out,) = s.receive(bad, T0)
    assert isinstance(out, pc.CloseConn) and out.code == 4000 and out.problem
    assert s.state is State.IDLE and s.receive(orjson.dumps(HELLO), T0) == []


@pytest.mark.parametrize(
    "bad",
    [
        subscribed("g", "e", 1, "yes"),  # type: ignore[arg-type]
        {"op": 0, "t": "READY", "d": None},
        {"op": 12, "d": []},
        {"op": 13, "d": {"code": "4403"}},
        {"op": 0, "t": "X", "g": 5, "s": 1, "d": None},
    ],
)
def test_a_message_that_breaks_the_protocol_closes_4000(bad: dict[str, Any]) -> None:
    s = ready(("g",))
    (out,) = recv(s, bad)
    assert isinstance(out, pc.CloseConn) and out.reason == "bad message from server"


def test_heartbeats_on_the_interval_pause_and_liveness() -> None:
    s = ClientSession()
    s.connection_made("tok", T0)
    recv(s, HELLO, T0)
    assert s.next_tick == T0 + 1.0
    assert s.tick(T0 + 0.5) == []
    assert s.tick(T0 + 1.0) == [pc.Send(pc.HEARTBEAT)]
    assert s.next_tick == T0 + 2.0
    s.pause_heartbeats(T0 + 2.5)
    recv(s, {"op": 11, "d": None}, T0 + 1.9)
    assert s.tick(T0 + 2.0) == []  # paused, still on schedule
    assert s.tick(T0 + 3.0) == [pc.Send(pc.HEARTBEAT)]
    # Silent for more than max(3 intervals, 5 s): replaced, unless the
    # adapter is the one not reading.
    s.stalled = True
    assert s.tick(T0 + 8.0) == [pc.Send(pc.HEARTBEAT)]
    s.stalled = False
    s.alive(T0 + 8.0)
    assert s.tick(T0 + 9.0) == [pc.Send(pc.HEARTBEAT)]
    (out,) = s.tick(T0 + 13.5)
    assert isinstance(out, pc.CloseConn) and out.reason == "server silent"
    assert s.next_tick == float("inf")


def test_identify_carries_positions_and_events_filter() -> None:
    s = ClientSession(["a", "b"], events=["X"])
    s.connection_made("tok", T0)
    assert sends(recv(s, HELLO)) == [
        {"op": 2, "d": {"token": "tok", "guilds": {"a": None, "b": None}, "events": ["X"]}}
    ]
    recv(s, READY)
    recv(s, subscribed("a", "e", 4, False))
    recv(s, event("a", 9))  # a filter skips s: no gap reported
    assert s.gaps == 0 and s.positions["a"] == Position("e", 9)
    s.connection_lost()
    s.connection_made("tok2", T0)
    (identify,) = sends(recv(s, HELLO))
    assert identify["d"]["guilds"] == {"a": {"epoch": "e", "s": 9}, "b": None}
    assert identify["d"]["token"] == "tok2"


def test_gap_and_duplicate_detection() -> None:
    s = ready(("g",))
    recv(s, subscribed("g", "e", 0, False))
    assert recv(s, event("g", 1)) == [Event("g", "N", 1, None)]
    assert recv(s, event("g", 1)) == []
    assert recv(s, event("g", 4)) == [pc.Gap("g", 1, 4), Event("g", "N", 4, None)]
    assert (s.duplicates_dropped, s.gaps) == (1, 1)
    assert recv(s, event("other", 1)) == []  # not followed


def test_resync_only_when_a_position_was_sent() -> None:
    s = ready(("g",))
    assert recv(s, subscribed("g", "e1", 3, False)) == [
        pc.Subscribed("g", Position("e1", 3), False)
    ]
    s.connection_lost()
    s.connection_made("tok", T0)
    recv(s, HELLO)
    recv(s, READY)
    assert recv(s, subscribed("g", "e1", 3, True)) == [pc.Subscribed("g", Position("e1", 3), True)]
    s.connection_lost()
    s.connection_made("tok", T0)
    recv(s, HELLO)
    recv(s, READY)
    assert recv(s, subscribed("g", "e2", 7, True)) == [  # recovered, but another epoch
        Resync("g", "e2", 7),
        pc.Subscribed("g", Position("e2", 7), True),
    ]


def test_publish_nonces_answers_and_interruption() -> None:
    s = ready()
    n1, send1 = s.publish("g", "X", {"a": 1})
    n2, _ = s.publish("g", "X", 2)
    n3, _ = s.publish("g", "X", 3)
    assert (n1, n2, n3) == ("1", "2", "3")
    assert orjson.loads(send1.data) == {
        "op": 5,
        "d": {"guild": "g", "t": "X", "d": {"a": 1}, "nonce": "1"},
    }
    ack = {"op": 12, "d": {"g": "g", "s": 5, "epoch": "e", "nonce": "1"}}
    assert recv(s, ack) == [pc.Acked("1", "g", 5, "e")]
    assert recv(s, ack) == []  # answered once
    err = {"op": 13, "d": {"code": 4429, "message": "slow down", "nonce": "2", "g": "g"}}
    assert recv(s, err) == [pc.PublishRefused("2", 4429, "slow down", "g")]
    assert s.unsubscribe("g") == []  # not followed: nothing to send
    assert s.connection_lost() == [pc.PublishInterrupted("3")]
    assert s.connection_lost() == []


@pytest.mark.parametrize(
    ("gid", "t", "d"),
    [
        ("bad guild", "X", 1),
        ("g", "lower", 1),
        ("g", "READY", 1),
        ("g", "X", {1, 2}),
        ("g", "X", "x" * 70_000),
    ],
)
def test_publish_refuses_locally_what_the_server_would_close_for(gid: str, t: str, d: Any) -> None:
    s = ready()
    with pytest.raises(ValueError):
        s.publish(gid, t, d)
    assert s.connection_lost() == []  # nothing was registered


def test_subscribe_and_unsubscribe_commands() -> None:
    s = ClientSession()
    assert s.subscribe("a") == []  # not connected: goes into the next IDENTIFY
    s.connection_made("tok", T0)
    assert sends(recv(s, HELLO))[0]["d"]["guilds"] == {"a": None}
    assert s.subscribe("b", Position("e", 2)) == []  # identifying: sent at READY
    out = recv(s, READY)
    assert sends(out) == [{"op": 3, "d": {"guilds": {"b": {"epoch": "e", "s": 2}}}}]
    assert s.subscribe("b") == []  # already requested
    recv(s, subscribed("a", "e", 0, False))
    assert s.subscribed("a") == Position("e", 0) and s.subscribed("b") is None
    assert sends(s.unsubscribe("a")) == [{"op": 4, "d": {"guilds": ["a"]}}]
    assert s.leaving("a") and not s.follows("a")
    assert recv(s, event("a", 1)) == []
    assert recv(s, {"op": 0, "t": "UNSUBSCRIBED", "g": "a", "d": None}) == [pc.Unsubscribed("a")]
    assert sends(s.unsubscribe("b")) == [{"op": 4, "d": {"guilds": ["b"]}}]
    assert s.connection_lost() == [pc.Unsubscribed("b")]
    with pytest.raises(ValueError):
        s.subscribe("no spaces")


def test_a_guild_left_while_identifying_is_unsubscribed_at_ready() -> None:
    """IDENTIFY asked for it, the application left it before READY: the server
    is subscribing it, so the session unsubscribes it at READY, and a refusal
    of it that arrives later is not a refusal of anything followed."""
    s = ClientSession(("c", "d"))
    s.connection_made("tok", T0)
    assert sends(recv(s, HELLO))[0]["d"]["guilds"] == {"c": None, "d": None}
    assert s.unsubscribe("c") == []
    out = recv(s, READY)
    assert sends(out) == [{"op": 4, "d": {"guilds": ["c"]}}]
    assert s.leaving("c") and not s.follows("c") and s.follows("d")
    err = {"op": 13, "d": {"code": 4403, "message": "no", "g": "c"}}
    assert recv(s, err) == [pc.ServerError(4403, "no", "c")]
    assert recv(s, subscribed("c", "e", 3, False)) == []
    assert recv(s, event("c", 4)) == []
    assert recv(s, {"op": 0, "t": "UNSUBSCRIBED", "g": "c", "d": None}) == [pc.Unsubscribed("c")]


def test_refused_subscription_stops_following_and_other_errors_are_reported() -> None:
    s = ready(("secret", "ok"))
    err = {"op": 13, "d": {"code": 4403, "message": "no", "g": "secret"}}
    assert recv(s, err) == [pc.SubscribeRefused("secret", 4403, "no")]
    assert set(s.positions) == {"ok"}
    assert recv(s, err) == [pc.ServerError(4403, "no", "secret")]
    assert recv(s, {"op": 7, "d": None}) == [pc.ReconnectRequested()]


def test_verdicts() -> None:
    s = ClientSession()
    assert s.verdict(4004, "").give_up
    assert s.verdict(4002, "").give_up and s.verdict(4002, "").action is CloseAction.FATAL
    v = s.verdict(1013, "")
    assert not v.give_up and v.floor == pc.BACKOFF_FLOOR
    assert s.verdict(1006, "").floor == 0 and not s.verdict(4010, "").give_up
    r = ClientSession(renewable_token=True)
    assert not r.verdict(4004, "").give_up  # one fresh token is tried
    assert r.verdict(4004, "").give_up  # a second refusal in a row is final
    r2 = ClientSession(renewable_token=True)
    assert not r2.verdict(4004, "").give_up
    r2.connection_made("t", T0)
    recv(r2, HELLO)
    recv(r2, READY)  # an accepted token resets the count
    assert not r2.verdict(4004, "").give_up
    assert s.connect_failed(404)[0] == 4002
    assert s.connect_failed(429)[0] == 1006 and s.connect_failed(None)[0] == 1006


def test_refused_connects_are_paced_by_the_restart_range_then_by_the_backoff() -> None:
    """PROTOCOL.md "Pacing": a refused connect is tried again soon, without
    growing (no range: a draw within REFUSED_WINDOW); after a RECONNECT's
    range, exactly its width later; past REFUSED_FOR s of refusals, None
    (the usual backoff); an opened connection forgets both."""
    s = ClientSession()
    assert s.connect_refused(T0, 0.5) == pytest.approx(0.5 * pc.REFUSED_WINDOW)
    assert s.connect_refused(T0 + 1, 0.5, cap=0.1) == pytest.approx(0.05)  # the cap bounds it
    assert s.connect_refused(T0 + pc.REFUSED_FOR + 0.5, 0.5) is None
    s.connection_made("t", T0 + 40)
    recv(s, HELLO)
    assert recv(s, {"op": 7, "d": {"min_delay_ms": 0, "max_delay_ms": 3800}}) == [
        pc.ReconnectRequested((0, 3800))
    ]
    s.connection_lost()
    assert s.verdict(1001, "").wait_ms == (0, 3800)
    # The range's width, whatever the draw: each client keeps its place in it.
    for k in range(3):
        assert s.connect_refused(T0 + 41 + 3.8 * k, 0.1 * k) == pytest.approx(3.8)
    s.connection_made("t", T0 + 60)  # a connection opened: the range is forgotten
    s.connection_lost()
    assert s.verdict(1006, "").wait_ms is None
    assert s.connect_refused(T0 + 61, 0.5) == pytest.approx(0.5)


def test_rewind_is_checked_at_the_call() -> None:
    with pytest.raises(ValueError):
        ClientSession(["g"], rewind=0)
    s = ready()
    for bad in (0, -2, 1.5, "3", True):
        with pytest.raises(ValueError):
            s.subscribe("g", rewind=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not both"):
        s.subscribe("g", Position("e", 1), rewind=3)
    with pytest.raises(ValueError, match="passive"):
        s.subscribe("g", rewind=3, passive=True)
    assert not s.follows("g")


def test_a_rewind_becomes_a_position_at_subscribed() -> None:
    s = ready()
    (out,) = s.subscribe("g", rewind=4)
    assert sends([out]) == [{"op": 3, "d": {"guilds": {"g": {"rewind": 4}}}}]
    assert s.positions == {"g": None} and s.subscribed("g") is None
    sub = subscribed("g", "e", 9, True)
    sub["d"]["rewound"] = 4
    assert recv(s, sub) == [pc.Subscribed("g", Position("e", 5), True)]
    assert [o for o in recv(s, event("g", 6)) if isinstance(o, Event)] == [Event("g", "N", 6, None)]
    assert s.subscribed("g") == Position("e", 6)
    s.connection_lost()
    s.connection_made("tok", T0)
    (again,) = recv(s, HELLO)
    assert sends([again])[0]["d"]["guilds"] == {"g": {"epoch": "e", "s": 6}}


@pytest.mark.parametrize("rewound", [None, -1, 10, "2", 1.0])
def test_subscribed_to_a_rewind_without_a_good_rewound_closes(rewound: Any) -> None:
    s = ready(("g",), rewind=3)
    sub = subscribed("g", "e", 9, True)
    if rewound is not None:
        sub["d"]["rewound"] = rewound
    (out,) = recv(s, sub)
    assert isinstance(out, pc.CloseConn) and out.code == pc.BAD_SERVER


# --- the state machine --------------------------------------------------------------


GUILDS = ("a", "b", "c")
CODES = (1000, 1001, 1006, 1013, 4000, 4002, 4004, 4008, 4009, 4010)


class ClientMachine(RuleBasedStateMachine):
    """A server model drives the session with valid and duplicate traffic;
    the invariants are the client's promises: each followed guild's events
    come out in increasing ``s`` with no duplicate, every PUBLISH is answered
    at most once (ACK, ERROR or interrupted), nothing is sent while not
    connected, and a guild is refused or resynced only as the protocol says;
    a rewind (1.1) is asked for until its SUBSCRIBED and never after."""

    def __init__(self) -> None:
        super().__init__()
        self.s = ClientSession(GUILDS[:1])
        self.now = T0
        #: Server side: guild -> (epoch, head).
        self.server: dict[str, tuple[str, int]] = {}
        self.epochs = 0
        self.conn = False
        self.pending: set[str] = set()
        self.answered: set[str] = set()
        #: Client promise: last s handed out per (guild, epoch).
        self.last: dict[tuple[str, str], int] = {}
        #: Guilds followed by a rewind not yet answered with SUBSCRIBED.
        self.rewinds: dict[str, int] = {}

    def feed(self, outs: list[pc.Output]) -> None:
        for o in outs:
            if isinstance(o, pc.Send):
                assert self.conn and self.s.state is not State.IDLE
            elif isinstance(o, Event):
                pos = self.s.positions[o.guild]
                assert pos is not None and pos.s == o.s
                assert pos.epoch == self.server[o.guild][0]  # the SUBSCRIBED one
                key = (o.guild, pos.epoch)
                assert o.s > self.last.get(key, -1), (o, self.last)
                self.last[key] = o.s
            elif isinstance(o, pc.Acked | pc.PublishRefused | pc.PublishInterrupted):
                assert o.nonce in self.pending and o.nonce not in self.answered
                self.pending.discard(o.nonce)
                self.answered.add(o.nonce)
            elif isinstance(o, pc.CloseConn):
                assert o.code == 4000

    def head(self, gid: str) -> tuple[str, int]:
        if gid not in self.server:
            self.epochs += 1
            self.server[gid] = (f"e{self.epochs}", 0)
        return self.server[gid]

    @precondition(lambda self: not self.conn)
    @rule()
    def open(self) -> None:
        self.conn = True
        self.s.connection_made("tok", self.now)

    @precondition(lambda self: self.s.state is State.AWAIT_HELLO)
    @rule()
    def hello(self) -> None:
        outs = recv(self.s, HELLO, self.now)
        (identify,) = sends(outs)
        assert identify["d"]["guilds"] == {
            g: {"rewind": self.rewinds[g]} if g in self.rewinds else pc.position_json(p)
            for g, p in self.s.positions.items()
        }
        self.feed(outs)

    @precondition(lambda self: self.s.state is State.IDENTIFYING)
    @rule()
    def ready(self) -> None:
        outs = recv(self.s, READY, self.now)
        self.feed(outs)
        assert self.s.ready
        # The server answers what the session sent at READY: an UNSUBSCRIBE of
        # guilds IDENTIFY asked for and the application left meanwhile.
        for msg in sends(outs):
            if msg["op"] == 4:
                for gid in msg["d"]["guilds"]:
                    assert self.s.leaving(gid) and not self.s.follows(gid)
                    unsub = {"op": 0, "t": "UNSUBSCRIBED", "g": gid, "d": None}
                    self.feed(recv(self.s, unsub, self.now))
                    assert not self.s.leaving(gid)

    @precondition(lambda self: self.s.ready)
    @rule(gid=st.sampled_from(GUILDS), lost=st.booleans())
    def answer_subscribe(self, gid: str, lost: bool) -> None:
        """SUBSCRIBED for a followed guild, recovering unless history was ``lost``."""
        if not self.s.follows(gid) or self.s.subscribed(gid) is not None:
            return
        if lost:
            self.server.pop(gid, None)
        epoch, head = self.head(gid)
        n = self.rewinds.pop(gid, None)
        if n is not None:  # the model's history holds every event
            k = min(n, head)
            sub = subscribed(gid, epoch, head, True)
            sub["d"]["rewound"] = k
            outs = recv(self.s, sub, self.now)
            assert outs == [pc.Subscribed(gid, Position(epoch, head - k), True)]
            for s in range(head - k + 1, head + 1):  # the replay
                self.feed(recv(self.s, event(gid, s, d=s), self.now))
            return
        pos = self.s.positions[gid]
        ok = pos is not None and pos.epoch == epoch and pos.s <= head
        outs = recv(self.s, subscribed(gid, epoch, head, ok), self.now)
        assert (pos is not None and not ok) == any(isinstance(o, Resync) for o in outs)
        self.feed(outs)
        if ok:
            assert pos is not None
            for s in range(pos.s + 1, head + 1):  # the replay
                self.feed(recv(self.s, event(gid, s, d=s), self.now))

    @precondition(lambda self: self.s.ready)
    @rule(gid=st.sampled_from(GUILDS))
    def refuse_subscribe(self, gid: str) -> None:
        """ERROR 4403 for a guild: a refusal only while its SUBSCRIBE is unanswered."""
        pending = self.s.follows(gid) and self.s.subscribed(gid) is None
        outs = recv(self.s, {"op": 13, "d": {"code": 4403, "message": "no", "g": gid}}, self.now)
        assert (outs == [pc.SubscribeRefused(gid, 4403, "no")]) == pending
        assert not pending or not self.s.follows(gid)
        if pending:
            self.rewinds.pop(gid, None)

    @precondition(lambda self: self.s.ready)
    @rule(gid=st.sampled_from(GUILDS), dup=st.booleans())
    def publish_event(self, gid: str, dup: bool) -> None:
        epoch, head = self.head(gid)
        if not dup or head == 0:
            head += 1
            self.server[gid] = (epoch, head)
        if self.s.subscribed(gid) is not None:
            self.feed(recv(self.s, event(gid, head, d=head), self.now))

    @rule(gid=st.sampled_from(GUILDS))
    def subscribe(self, gid: str) -> None:
        self.feed(self.s.subscribe(gid))

    @rule(gid=st.sampled_from(GUILDS), n=st.integers(1, 5))
    def subscribe_rewind(self, gid: str, n: int) -> None:
        if not self.s.follows(gid):
            self.rewinds[gid] = n
        self.feed(self.s.subscribe(gid, rewind=n))

    @rule(gid=st.sampled_from(GUILDS))
    def unsubscribe(self, gid: str) -> None:
        self.rewinds.pop(gid, None)
        self.feed(self.s.unsubscribe(gid))
        assert not self.s.follows(gid)
        if self.s.leaving(gid) and self.s.ready:
            self.feed(recv(self.s, {"op": 0, "t": "UNSUBSCRIBED", "g": gid, "d": None}, self.now))
            assert not self.s.leaving(gid)

    @precondition(lambda self: self.s.ready)
    @rule(gid=st.sampled_from(GUILDS))
    def publish(self, gid: str) -> None:
        nonce, send = self.s.publish(gid, "X", None)
        assert nonce not in self.pending and nonce not in self.answered
        self.pending.add(nonce)
        self.feed([send])

    @precondition(lambda self: self.s.ready and self.pending)
    @rule(data=st.data(), refuse=st.booleans())
    def answer_publish(self, data: st.DataObject, refuse: bool) -> None:
        nonce = data.draw(st.sampled_from(sorted(self.pending)))
        if refuse:
            msg = {"op": 13, "d": {"code": 4429, "message": "m", "nonce": nonce, "g": "a"}}
        else:
            msg = {"op": 12, "d": {"g": "a", "s": 1, "epoch": "e", "nonce": nonce}}
        self.feed(recv(self.s, msg, self.now))
        assert nonce in self.answered

    @precondition(lambda self: self.s.ready)
    @rule(nonce=st.sampled_from(["0", "999", "x"]))
    def stray_ack(self, nonce: str) -> None:
        msg = {"op": 12, "d": {"g": "a", "s": 1, "epoch": "e", "nonce": nonce}}
        assert recv(self.s, msg, self.now) == []

    @precondition(lambda self: self.conn)
    @rule(dt=st.floats(0, 20))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.feed(self.s.tick(self.now))

    @precondition(lambda self: self.conn)
    @rule()
    def garbage(self) -> None:
        self.feed(self.s.receive(b"{not json", self.now))
        assert self.s.state is State.IDLE

    @precondition(lambda self: self.conn)
    @rule(code=st.sampled_from(CODES))
    def close(self, code: int) -> None:
        self.conn = False
        outs = self.s.connection_lost()
        interrupted = {o.nonce for o in outs if isinstance(o, pc.PublishInterrupted)}
        assert interrupted == self.pending
        self.feed(outs)
        assert not self.pending
        v = self.s.verdict(code, "")
        assert v.give_up == (pc.classify_close(code) in (CloseAction.FATAL, CloseAction.AUTH))

    @invariant()
    def consistent(self) -> None:
        s = self.s
        assert (s.state is State.IDLE) or self.conn
        for gid, pos in s.positions.items():
            assert gid in GUILDS
            if pos is not None and s.subscribed(gid) is not None:
                assert pos.s <= self.server.get(gid, (pos.epoch, pos.s))[1]
        assert s.duplicates_dropped >= 0 and s.gaps == 0


TestClientMachine = ClientMachine.TestCase
TestClientMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_a_1013_before_ready_is_asked_again_by_ready() -> None:
    s = ClientSession(["b"], random=lambda: 0.5)
    s.connection_made("tok", T0)
    recv(s, HELLO)
    (out,) = recv(s, {"op": 13, "d": {"code": 1013, "message": "busy", "g": "b"}})
    assert out == pc.SubscribeDeferred("b", 1013, "busy", 0.0)
    assert s.next_tick == T0 + 1.0  # nothing scheduled: READY asks for it
    assert sends(recv(s, READY)) == [SUB_B]
