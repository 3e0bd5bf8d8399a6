"""Admission control and staggered drain (PROTOCOL.md "Pacing: retry hints
and staggered RECONNECT"): resumes before fresh sessions, the retry hint of
a close 1013, RECONNECTs spread over the drain window with a delay range
for 1.1 sessions, and both of our clients honouring the hints."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from guildcast.client import Backoff, Client
from guildcast.protocol import hints
from guildcast.protocol.codes import SUBPROTOCOL
from guildcast.transport.admission import (
    FRESH_RESERVE,
    LAG_TARGET,
    MAX_WAIT,
    MIN_SHARE,
    QUEUED,
    Admission,
)
from guildcast.transport.drain import drain_window, reconnect_delay_ms
from tests.support.gateway import (
    DISPATCH,
    HELLO,
    IDENTIFY,
    RECONNECT,
    SUBSCRIBE,
    close_code,
    open_ws,
    recv,
    send,
    session,
)
from tests.support.node import node, restartable
from tests.support.wait import TIMEOUT, until

FAST = {"base": 0.02, "cap": 0.2}


# --- the policy, with the clock given --------------------------------------------


def test_resumes_are_admitted_where_fresh_sessions_are_refused() -> None:
    a = Admission(10.0, now=0.0)
    # A burst of fresh sessions takes the bucket down to the resumes' reserve...
    fresh = [a.identify(False, 0.0) for _ in range(10)]
    admitted = sum(r is None for r in fresh)
    # Fresh ones need 1 + FRESH_RESERVE x 9 = 5.5 tokens: 5 get in, 5 are left.
    assert FRESH_RESERVE == 0.5 and admitted == 5
    refusal = next(r for r in fresh if r is not None)
    # ... where every resume still gets in, until the bucket is empty.
    resumes = [a.identify(True, 0.0) for _ in range(10)]
    assert sum(r is None for r in resumes) == 10 - admitted
    assert a.stats.admitted_resume == 10 - admitted
    assert a.stats.refused_fresh == 5 and a.stats.refused_resume == 5
    # The hint: a range that starts when this class would find a token again.
    lo, hi = hints.parse_retry(refusal) or (0, 0)
    assert 0 < lo < hi
    assert a.identify(False, lo / 1000.0) is not None  # resumes took what refilled
    assert a.identify(True, 1.0) is None  # a second later, tokens again


def test_hint_spread_grows_with_the_crowd() -> None:
    a = Admission(100.0, now=0.0)
    for _ in range(100):
        a.identify(True, 0.0)
    first = hints.parse_retry(a.identify(True, 0.0) or "")
    for _ in range(498):
        a.identify(True, 0.0)
    last = hints.parse_retry(a.identify(True, 0.0) or "")
    assert first is not None and last is not None
    # 500 refused at 100/s: the last is told to spread over about 5 s.
    assert last[1] - last[0] >= 4000 > first[1] - first[0]


def test_handshakes_are_bounded_at_twice_the_rate() -> None:
    a = Admission(5.0, now=0.0)
    got = [a.handshake(0.0) for _ in range(12)]
    assert sum(r is None for r in got) == 10
    assert a.stats.refused_handshake == 2
    assert hints.parse_retry(got[-1] or "") is not None
    assert Admission(0.0, now=0.0).handshake(0.0) is None  # 0: no bound


def test_reconnect_delay_range() -> None:
    assert reconnect_delay_ms(10, 0.0, 100.0) == (0, 1000)  # at least a second
    # A lone node (no waves): its 19,000 clients over the 12.7 s it takes
    # to admit them at 1,500/s when it is back.
    assert reconnect_delay_ms(19_000, 0.0, 1500.0) == (0, 12_666)
    assert reconnect_delay_ms(19_000, 5.0, 1500.0) == (0, 7666)  # waves did 5 s
    assert reconnect_delay_ms(19_000, 0.0, 0.0) == (0, 1000)


def test_drain_window() -> None:
    assert drain_window(1, 5.0, 100.0) == 0.0
    assert drain_window(50, 5.0, 100.0) == 0.5  # the time to admit them
    assert drain_window(10_000, 5.0, 100.0) == 5.0  # at most the spread
    assert drain_window(10_000, 5.0, 0.0) == 0.0  # no bound: all at once


# --- a real node -------------------------------------------------------------------


async def _identify_raw(url: str, token: str, guilds: dict[str, Any]) -> Any:
    """IDENTIFY with a plain websockets client; returns the socket after
    HELLO and IDENTIFY are through (READY or a close follows)."""
    ws = await open_ws(url)
    assert (await recv(ws))["op"] == HELLO
    await send(ws, IDENTIFY, {"token": token, "guilds": guilds})
    return ws


async def _first_answer(ws: Any) -> tuple[int | None, list[Any]]:
    """``(None, [READY])``, or the close code if the server closed instead."""
    try:
        return None, [await recv(ws)]
    except ConnectionClosed:
        return ws.close_code, []


async def _admitted(url: str, token: str, subprotocols: list[Subprotocol] | None) -> Any:
    """A READY session, following the retry hints of the 1013s on the way."""
    while True:
        ws = await open_ws(url, subprotocols=subprotocols)
        assert (await recv(ws))["op"] == HELLO
        await send(ws, IDENTIFY, {"token": token, "guilds": {}})
        code, _ = await _first_answer(ws)
        if code is None:
            return ws
        hint = hints.parse_retry(ws.close_reason or "")
        assert code == 1013 and hint is not None
        await asyncio.sleep(hint[0] / 1000)


async def test_node_queues_fresh_admits_resumes_first_and_hints_the_rest() -> None:
    async with node(admit_rate=10.0) as srv:
        adm = srv.gateway.admission
        tok = srv.token("u", guilds=["*"])
        ws0, subs = await session(srv.url, tok, {"g": None})
        position = {"epoch": subs["g"]["epoch"], "s": subs["g"]["s"]}
        # 15 fresh sessions at once: a few find a token (fresh ones leave
        # half the burst to resumes), the rest wait their turn.
        fresh = await asyncio.gather(*(_identify_raw(srv.url, tok, {}) for _ in range(15)))
        await until(lambda: adm.stats.queued_fresh >= 5, "fresh sessions to wait")
        # A resume (a Position) goes ahead of every waiting fresh session.
        ws = await _identify_raw(srv.url, tok, {"g": position})
        m = await recv(ws)
        assert m["op"] == DISPATCH and m["t"] == "READY", m
        assert adm.waiting > 0  # fresh sessions that came first still wait
        assert adm.stats.admitted_resume == 1 and adm.stats.refused_resume == 0
        m = await recv(ws)
        assert m["t"] == "SUBSCRIBED" and m["d"]["recovered"] is True
        # The waiting fresh ones get in as tokens come (10/s).
        for code, seen in await asyncio.gather(*(_first_answer(w) for w in fresh)):
            assert code is None and seen[0]["t"] == "READY", (code, seen)
        assert adm.stats.admitted_fresh == 16 and adm.waiting == 0
        for w in [ws0, ws, *fresh]:
            await w.close()


async def test_messages_behind_a_waiting_identify_keep_their_order() -> None:
    async with node(admit_rate=1.0) as srv:  # one IDENTIFY a second
        tok = srv.token("u", guilds=["*"])
        ws0, _ = await session(srv.url, tok, {})
        ws = await open_ws(srv.url)
        assert (await recv(ws))["op"] == HELLO
        # IDENTIFY waits for its token; the SUBSCRIBE sent right behind it
        # waits with it, and both are served in order (no 4003).
        await send(ws, IDENTIFY, {"token": tok, "guilds": {}})
        await send(ws, SUBSCRIBE, {"guilds": {"g2": None}})
        m = await recv(ws)
        assert m["t"] == "READY", m
        m = await recv(ws)
        assert m["t"] == "SUBSCRIBED" and m["g"] == "g2", m
        assert srv.gateway.admission.stats.queued_fresh == 1
        await ws.close()
        await ws0.close()


async def test_node_refuses_past_the_bound_with_a_retry_hint() -> None:
    async with node(admit_rate=10.0) as srv:
        # 40 upgrades at once: twice the rate's burst get through, the rest
        # are closed 1013 with a hint the client can read.
        socks = await asyncio.gather(*(open_ws(srv.url) for _ in range(40)))
        refused = []
        for ws in socks:
            try:
                assert (await recv(ws))["op"] == HELLO
            except ConnectionClosed:
                refused.append(ws)
        assert len(refused) >= 15
        for ws in refused:
            assert ws.close_code == 1013
            hint = hints.parse_retry(ws.close_reason or "")
            assert hint is not None and 0 < hint[0] < hint[1], ws.close_reason
        assert srv.gateway.admission.stats.refused_handshake == len(refused)
        for ws in socks:
            await ws.close()


class _Waiting:
    """What the queue holds of a connection (transport/admission.Waiter)."""

    def __init__(self) -> None:
        self.closing = False


def test_the_queue_serves_resumes_first_and_is_bounded() -> None:
    a = Admission(4.0, now=0.0)  # burst 4: fresh ones need 2.5 tokens
    first = [_Waiting() for _ in range(2)]
    assert [a.arrive(w, False, 0.0) for w in first] == [None, None]  # 4 -> 2 tokens
    fresh = [_Waiting() for _ in range(5)]
    assert all(a.arrive(w, False, 0.0) == QUEUED for w in fresh)
    # Two tokens left: resumes go past the waiting fresh ones and take them.
    assert [a.arrive(_Waiting(), True, 0.0) for _ in range(2)] == [None, None]
    late = _Waiting()
    assert a.arrive(late, True, 0.0) == QUEUED  # none left: first in the resume queue
    gone = fresh.pop(0)
    gone.closing = True  # closed while waiting: dropped, takes no token
    # max_waiting = 2 s of 4/s = 8: six wait, two more fit, the third is refused.
    assert a.arrive(_Waiting(), False, 0.0) == QUEUED
    assert a.arrive(_Waiting(), False, 0.0) == QUEUED
    refusal = a.arrive(_Waiting(), True, 0.0)
    assert refusal is not None and refusal != QUEUED and hints.parse_retry(refusal)
    admitted, refused = a.due(0.5)  # 2 tokens refilled: the resume, then nothing fresh
    assert admitted == [late] and refused == []
    admitted, _ = a.due(1.4)  # 1 + 3.6 tokens: fresh ones from 2.5 up, one each
    assert admitted == fresh[:2]
    admitted, refused = a.due(MAX_WAIT + 1)  # waited too long: refused with a hint
    assert admitted == [] and len(refused) == 4
    assert all(hints.parse_retry(r) for _, r in refused)
    assert a.waiting == 0


async def test_staggered_reconnect_with_a_delay_range() -> None:
    n = 12
    async with restartable(admit_rate=10.0, drain_spread=3.0, drain_timeout=TIMEOUT) as r:
        tok = r.srv.token("u", guilds=["*"])
        one_one = [Subprotocol(SUBPROTOCOL)]
        socks = [await _admitted(r.url, tok, one_one) for _ in range(n)]
        socks.append(await _admitted(r.url, tok, None))  # protocol 1.0: no subprotocol
        arrived: list[tuple[float, Any]] = []

        async def reconnect_of(ws: Any) -> None:
            m = await recv(ws, TIMEOUT)
            assert m["op"] == RECONNECT, m
            arrived.append((time.monotonic(), m["d"]))
            code, _ = await close_code(ws)
            assert code == 1001

        waiting = [asyncio.create_task(reconnect_of(ws)) for ws in socks]
        stop = asyncio.create_task(r.srv.stop())
        await asyncio.gather(*waiting)
        await stop
        ds = [d for _, d in arrived]
        assert ds.count(None) == 1  # the 1.0 session: d null, as in 1.0
        for d in ds:
            if d is not None:
                assert hints.parse_reconnect(d) == (0, 1000)
        # 13 sessions at 10/s: spread over 1.3 s (in waves), not sent at once.
        times = sorted(t for t, _ in arrived)
        assert times[-1] - times[0] >= 0.5, times


async def test_python_client_follows_retry_hints() -> None:
    async with node(admit_rate=5.0) as srv:
        tok = srv.token("u", guilds=["*"])
        clients = [Client(srv.url, tok, guilds=["g"], backoff=Backoff(**FAST)) for _ in range(15)]
        started = time.monotonic()
        try:
            await asyncio.gather(*(c.connect() for c in clients))
            took = time.monotonic() - started
            waits = sum(c.counters["hinted_waits"] for c in clients)
            assert sum(c.counters["try_again_later"] for c in clients) >= 1
            assert waits >= 1 and all(c.counters["gave_up"] == 0 for c in clients)
            # 15 fresh sessions at 5/s with half the burst reserved: the hints,
            # not the 0.2 s backoff cap, paced them.
            assert took >= 1.0
            assert srv.gateway.admission.stats.admitted_fresh == 15
        finally:
            await asyncio.gather(*(c.close() for c in clients))


async def test_python_client_waits_the_reconnect_delay() -> None:
    async with restartable(drain_timeout=TIMEOUT) as r:
        tok = r.srv.token("u", guilds=["*"])
        async with Client(r.url, tok, guilds=["g"], backoff=Backoff(**FAST)) as c:
            await c.connect()
            await r.restart()
            await until(lambda: c.sessions == 2, "the client to come back")
            assert c.counters["reconnect_requests"] == 1
            assert c.counters["hinted_waits"] == 1
            assert c.subprotocol == SUBPROTOCOL


def test_a_late_loop_slows_admissions_down_and_back_up() -> None:
    a = Admission(100.0, now=0.0)
    for _ in range(100):
        assert a.identify(True, 0.0) is None  # the burst
    a.loop_lag(LAG_TARGET * 4)  # behind its live traffic: halve
    assert a.share == 0.5
    # One second at half the rate refills 50 tokens, not 100.
    assert sum(a.identify(True, 1.0) is None for _ in range(100)) == 50
    for _ in range(10):
        a.loop_lag(1.0)
    assert a.share == MIN_SHARE and a.stats.slowdowns == 11
    for _ in range(5):
        a.loop_lag(0.0)  # on time again: back up step by step
    assert a.share == pytest.approx(1.0)
    Admission(0.0, now=0.0).loop_lag(1.0)  # no bound: nothing to slow


@pytest.mark.parametrize(
    ("d", "resume"),
    [
        ({"token": "t", "guilds": {"g": {"epoch": "e", "s": 3}}}, True),
        ({"token": "t", "guilds": {"g": {"epoch": "e", "s": 3, "passive": True}}}, True),
        ({"token": "t", "guilds": {"a": None, "g": {"epoch": "e", "s": 0}}}, True),
        ({"token": "t", "guilds": {"g": None}}, False),
        ({"token": "t", "guilds": {"g": {"rewind": 50}}}, False),  # fresh: no Position
        ({"token": "t", "guilds": {"g": {"passive": True}}}, False),
        ({"token": "t", "guilds": {"g": {"epoch": 1, "s": "x"}}}, False),  # refused later
        ({"token": "t"}, False),  # no guilds: a fresh IDENTIFY, still counted
        ({"token": "t", "guilds": {}}, False),
    ],
)
def test_an_identify_is_a_resume_only_when_it_names_a_position(
    d: dict[str, Any], resume: bool
) -> None:
    from guildcast.protocol import wire
    from guildcast.transport.gateway import _identify_resume

    assert _identify_resume(wire.encode({"op": IDENTIFY, "d": d})) is resume


def test_what_is_not_an_identify_is_left_to_the_session() -> None:
    from guildcast.transport.gateway import _identify_resume

    assert _identify_resume(b"not json") is None
    assert _identify_resume(b'{"op": 1, "d": null}') is None
    assert _identify_resume(b'{"op": 2, "d": null}') is None
    assert _identify_resume(b'{"op": 2, "d": {"guilds": []}}') is None


async def test_an_identify_without_guilds_waits_its_turn_too() -> None:
    async with node(admit_rate=1.0) as srv:  # one IDENTIFY a second
        tok = srv.token("u", guilds=["*"])
        ws0, _ = await session(srv.url, tok, {})
        ws = await open_ws(srv.url)
        assert (await recv(ws))["op"] == HELLO
        await send(ws, IDENTIFY, {"token": tok})
        m = await recv(ws)
        assert m["t"] == "READY", m
        assert srv.gateway.admission.stats.queued_fresh == 1
        await ws.close()
        await ws0.close()
