"""The golden protocol cases (tests/protocol/cases.json) against the Sans-I/O
client session; clients/js/test/cases.test.mjs runs the same file against
guildcast.js, so both clients build the same bytes and react the same way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import orjson
import pytest

from guildcast.protocol import client as pc
from guildcast.protocol import hints, wire
from guildcast.protocol.client import ClientSession, Event, Position, Resync, Rewind
from guildcast.protocol.codes import PROTOCOL_VERSION, SUBPROTOCOL, Err

CASES = json.loads((Path(__file__).parent / "cases.json").read_text())


def _pos(p: dict[str, Any] | None) -> Position | Rewind | None:
    if p is not None and "rewind" in p:
        return Rewind(p["rewind"])  # protocol 1.1
    return None if p is None else Position(p["epoch"], p["s"])


def build(kind: str, args: dict[str, Any]) -> bytes:
    if kind == "heartbeat":
        return pc.HEARTBEAT
    if kind == "identify":
        guilds = {g: _pos(p) for g, p in args["guilds"].items()}
        return pc.identify_message(
            args["token"],
            guilds,
            args.get("events"),
            args.get("presence", False),
            set(args.get("passive", [])),
            args.get("activity_batch", False),
        )
    if kind == "subscribe":
        guilds = {g: _pos(p) for g, p in args["guilds"].items()}
        return pc.subscribe_message(guilds, set(args.get("passive", [])))
    if kind == "unsubscribe":
        return pc.unsubscribe_message(args["guilds"])
    assert kind == "publish", kind
    return pc.publish_message(
        args["guild"], args["t"], args["d"], args.get("nonce"), args.get("idempotency_key")
    )


@pytest.mark.parametrize("case", CASES["messages"], ids=lambda c: c["build"])
def test_client_messages_are_exact(case: dict[str, Any]) -> None:
    assert build(case["build"], case["args"]).decode() == case["json"]


@pytest.mark.parametrize("code", sorted(CASES["close_codes"]))
def test_close_code_classification(code: str) -> None:
    assert pc.classify_close(int(code)).value == CASES["close_codes"][code]


def test_protocol_1_1_constants() -> None:
    """The subprotocol and ERROR codes both clients must agree on."""
    assert CASES["protocol_version"] == PROTOCOL_VERSION
    assert CASES["subprotocol"] == SUBPROTOCOL
    assert CASES["error_codes"] == {
        "invalid_event_name": Err.INVALID_EVENT_NAME,
        "invalid_idempotency_key": Err.INVALID_IDEMPOTENCY_KEY,
        "idempotency_conflict": Err.IDEMPOTENCY_CONFLICT,
    }


def test_grammar() -> None:
    g = CASES["grammar"]
    assert all(wire.valid_guild(x) for x in g["valid_guilds"])
    assert not any(wire.valid_guild(x) for x in g["invalid_guilds"])
    assert all(wire.valid_event(x) for x in g["valid_events"])
    assert not any(wire.valid_event(x) for x in g["invalid_events"])
    assert all(wire.valid_idempotency_key(x) for x in g["valid_idempotency_keys"])
    assert not any(wire.valid_idempotency_key(x) for x in g["invalid_idempotency_keys"])
    for x in g["invalid_idempotency_keys"]:
        if x is not None:  # None is "no key", which the client leaves out
            with pytest.raises(ValueError):
                pc.check_idempotency_key(x)


class Driver:
    """Runs one scenario's steps; maps outputs to the cases' items as the
    asyncio client does (a refusal answers a waiting subscribe(), else it
    is a lost subscription)."""

    def __init__(
        self,
        guilds: list[str],
        rewind: int | None = None,
        presence: bool = False,
        activity_batch: bool = False,
    ) -> None:
        # The JS suite's backoff (base 0, cap 0, random 0): a 1013's retry
        # delay is its hint's minimum, or 0.
        self.session = ClientSession(
            guilds,
            rewind=rewind,
            presence=presence,
            activity_batch=activity_batch,
            retry_base=0.0,
            retry_cap=0.0,
            random=lambda: 0.0,
        )
        self.waiters: set[str] = set()
        self.now = 100.0

    def step(self, step: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]], bool | None]:
        s = self.session
        self.wait_ms: list[int] | None = None
        self.now += 0.001
        outs: list[pc.Output] = []
        reconnects: bool | None = None
        if "open" in step:
            s.connection_made("tok", self.now)
        elif "recv" in step:
            outs = s.receive(orjson.dumps(step["recv"]), self.now)
        elif "subscribe" in step:
            if s.subscribed(step["subscribe"]) is None:
                self.waiters.add(step["subscribe"])
            outs = s.subscribe(
                step["subscribe"],
                rewind=step.get("rewind"),
                passive=step.get("passive", False),
            )
        elif "activate" in step or "deactivate" in step:
            gid = step.get("activate") or step["deactivate"]
            self.waiters.add(gid)
            outs = s.set_passive(gid, "deactivate" in step)
        elif "unsubscribe" in step:
            self.waiters.discard(step["unsubscribe"])
            outs = s.unsubscribe(step["unsubscribe"])
        elif "publish" in step:
            p = step["publish"]
            outs = [s.publish(p["guild"], p["t"], p["d"], p.get("idempotency_key"))[1]]
        elif "sleep" in step:
            self.now += step["sleep"]
        else:
            outs = s.connection_lost()
            verdict = s.verdict(step["close"], step.get("reason", ""))
            reconnects = not verdict.give_up
            self.wait_ms = None if verdict.wait_ms is None else list(verdict.wait_ms)
        if s.next_tick <= self.now:  # the adapter's timer: what fell due by now
            outs += s.tick(self.now)
        sent = [o.data.decode() for o in outs if isinstance(o, pc.Send)]
        return sent, [i for o in outs if (i := self.item(o)) is not None], reconnects

    def item(self, o: pc.Output) -> dict[str, Any] | None:
        if isinstance(o, Event):
            return {"kind": "event", "guild": o.guild, "name": o.name, "s": o.s, "data": o.data}
        if isinstance(o, Resync):
            return {"kind": "resync", "guild": o.guild, "epoch": o.epoch, "s": o.s}
        if isinstance(o, pc.Ready):
            return {"kind": "ready", "session_id": o.session_id, "user": o.user}
        if isinstance(o, pc.Subscribed) and o.guild in self.waiters:
            self.waiters.discard(o.guild)
            p = o.position
            return {"kind": "subscribed", "guild": o.guild, "epoch": p.epoch, "s": p.s}
        if isinstance(o, pc.Unsubscribed):
            return {"kind": "unsubscribed", "guild": o.guild}
        if isinstance(o, pc.SubscribeRefused):
            kind = "subscribe_refused" if o.guild in self.waiters else "subscription_lost"
            self.waiters.discard(o.guild)
            return {"kind": kind, "guild": o.guild, "code": o.code}
        if isinstance(o, pc.SubscribeDeferred):
            delay_ms = round(o.delay * 1000)
            return {
                "kind": "subscribe_deferred",
                "guild": o.guild,
                "code": o.code,
                "delay_ms": delay_ms,
            }
        if isinstance(o, pc.Activity):
            return {"kind": "activity", "guild": o.guild, "epoch": o.epoch, "s": o.s}
        if isinstance(o, pc.Acked):
            return {"kind": "acked", "nonce": o.nonce, "s": o.s}
        if isinstance(o, pc.PublishRefused):
            return {"kind": "publish_refused", "nonce": o.nonce, "code": o.code}
        if isinstance(o, pc.PresenceSnapshot):
            sessions = [m.session for m in o.members]
            return {
                "kind": "presence_snapshot",
                "guild": o.guild,
                "sessions": sessions,
                "count": o.count,
                "truncated": o.truncated,
            }
        if isinstance(o, pc.PresenceJoin | pc.PresenceLeave):
            kind = "presence_join" if isinstance(o, pc.PresenceJoin) else "presence_leave"
            return {
                "kind": kind,
                "guild": o.guild,
                "user": o.member.user,
                "session": o.member.session,
            }
        return None


@pytest.mark.parametrize("scenario", CASES["sessions"], ids=lambda c: c["name"][:40])
def test_session_scenario(scenario: dict[str, Any]) -> None:
    d = Driver(
        scenario["guilds"],
        scenario.get("rewind"),
        scenario.get("presence", False),
        scenario.get("activity_batch", False),
    )
    for i, step in enumerate(scenario["steps"]):
        sent, items, reconnects = d.step(step)
        where = f"step {i}: {step}"
        if "sent" in step:
            assert sent == step["sent"], where
        if "items" in step:
            assert items == step["items"], where
        if "reconnects" in step:
            assert reconnects == step["reconnects"], where
        if "wait_ms" in step:
            assert d.wait_ms == step["wait_ms"], where
        if "positions" in step:
            got = {g: pc.position_json(p) for g, p in d.session.positions.items()}
            assert got == step["positions"], where
        if "duplicates" in step:
            assert d.session.duplicates_dropped == step["duplicates"], where
        if "unread" in step:
            got_unread = {g: d.session.unread(g) for g in step["unread"]}
            assert got_unread == step["unread"], where
        if "rosters" in step:
            rosters = {
                g: {
                    "sessions": [m.session for m in r.members],
                    "count": r.count,
                    "truncated": r.truncated,
                }
                for g, r in d.session.rosters().items()
            }
            assert rosters == step["rosters"], where


@pytest.mark.parametrize("case", CASES["pacing"]["retry_hints"], ids=lambda c: c["reason"][:30])
def test_retry_hint_parsing(case: dict[str, Any]) -> None:
    got = hints.parse_retry(case["reason"])
    assert (None if got is None else list(got)) == case["wait_ms"]


@pytest.mark.parametrize("case", CASES["pacing"]["reconnect_delays"], ids=str)
def test_reconnect_delay_parsing(case: dict[str, Any]) -> None:
    got = hints.parse_reconnect(case["d"])
    assert (None if got is None else list(got)) == case["wait_ms"]


@pytest.mark.parametrize("case", CASES["pacing"]["paced_delays"], ids=str)
def test_paced_delay(case: dict[str, Any]) -> None:
    wait = None if case["wait_ms"] is None else tuple(case["wait_ms"])
    assert pc.paced_delay(case["backoff"], wait, case["u"]) == pytest.approx(case["delay"])


@pytest.mark.parametrize("case", CASES["pacing"]["refused_delays"], ids=str)
def test_refused_delay(case: dict[str, Any]) -> None:
    restart = None if case["restart_ms"] is None else tuple(case["restart_ms"])
    got = pc.refused_delay(restart, case["refused_for"], case["u"], case["cap"])
    if case["delay"] is None:
        assert got is None
    else:
        assert got == pytest.approx(case["delay"])


def test_server_hints_read_back() -> None:
    """What the server writes (hints.retry_reason, hints.reconnect_frame) is
    what the clients read."""
    assert hints.parse_retry(hints.retry_reason("server busy", 10, 20)) == (10, 20)
    frame = hints.reconnect_frame(0, 1000)
    msg = orjson.loads(frame[2:])
    assert msg == {"op": 7, "d": {"min_delay_ms": 0, "max_delay_ms": 1000}}
    assert hints.parse_reconnect(msg["d"]) == (0, 1000)
