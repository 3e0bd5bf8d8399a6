"""Client frames the gateway reads itself (server/transport/inbound.py):
the frame kinds ``next_frame`` tells apart, and on real sockets a session
whose frames (plain text ones, pings, a fragmented message) arrive in one
read, split at every byte, or anything in between gets the same answers in
the same order as when each frame comes on its own."""

from __future__ import annotations

import asyncio
import os
import socket

import orjson
import pytest
from websockets.frames import Frame, Opcode

from guildcast import Server
from guildcast.protocol.frames import client_frame
from guildcast.transport import inbound
from tests.integration.raw import RawWs
from tests.support import gateway as gw
from tests.support.wait import TIMEOUT

MAX = 64 * 1024


def masked(op: Opcode, payload: bytes, fin: bool = True, rsv1: bool = False) -> bytes:
    return client_frame(op.value, payload, fin=fin, rsv=4 if rsv1 else 0)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 1000, 65535, 65536])
def test_a_complete_text_frame_is_ours(size: int) -> None:
    payload = os.urandom(size)
    data = b"xx" + masked(Opcode.TEXT, payload) + b"tail"
    kind, end, key_at = inbound.next_frame(data, 2, MAX)
    assert kind == inbound.TEXT
    assert data[end:] == b"tail"
    assert inbound.unmask(data, key_at, end) == payload


def test_every_prefix_of_a_frame_is_partial() -> None:
    for size in (5, 200, 70_000):
        data = masked(Opcode.TEXT, b"a" * size)
        cap = max(MAX, size)
        for cut in range(len(data)):
            assert inbound.next_frame(data[:cut], 0, cap)[0] == inbound.PARTIAL, (size, cut)
        assert inbound.next_frame(data, 0, cap)[0] == inbound.TEXT


@pytest.mark.parametrize(
    "frame",
    [
        masked(Opcode.PING, b"p"),
        masked(Opcode.PONG, b""),
        masked(Opcode.CLOSE, b"\x03\xe8"),
        masked(Opcode.BINARY, b"\x00\x01"),
        masked(Opcode.TEXT, b"{", fin=False),
        masked(Opcode.CONT, b"}"),
        masked(Opcode.TEXT, b"{}", rsv1=True),
        b"\x83\x80abcd",  # a reserved opcode: websockets refuses it
    ],
)
def test_other_whole_frames_are_websockets(frame: bytes) -> None:
    kind, end, _ = inbound.next_frame(frame, 0, MAX)
    assert (kind, end) == (inbound.WHOLE, len(frame))


def test_unmasked_or_oversized_frames_are_handed_over() -> None:
    unmasked = Frame(Opcode.TEXT, b"{}").serialize(mask=False)
    assert inbound.next_frame(unmasked, 0, MAX)[0] == inbound.HANDOVER
    # Told by the header alone, as websockets fails it (1009) before the payload.
    big = masked(Opcode.TEXT, b"a" * (MAX + 1))[:14]
    assert inbound.next_frame(big, 0, MAX)[0] == inbound.HANDOVER
    huge = b"\x81\xff" + (2**63).to_bytes(8, "big")
    assert inbound.next_frame(huge, 0, MAX)[0] == inbound.HANDOVER


def _script(server: Server) -> tuple[list[bytes], int]:
    """A session's frames and how many answers they get: IDENTIFY (READY,
    SUBSCRIBED), PUBLISHes (ACK each, and each event), a HEARTBEAT, a ping,
    and a PUBLISH in two fragments with a ping between them."""
    tok = server.token("u", pub=["*"])

    def text(obj: object) -> bytes:
        return masked(Opcode.TEXT, orjson.dumps(obj))

    def publish(i: int) -> dict[str, object]:
        return {"op": gw.PUBLISH, "d": {"guild": "g", "t": "EV", "d": {"i": i}, "nonce": str(i)}}

    split = orjson.dumps(publish(3))
    frames = [
        text({"op": gw.IDENTIFY, "d": {"token": tok, "guilds": {"g": None}}}),
        text(publish(0)),
        text(publish(1)),
        masked(Opcode.PING, b"hi"),
        text({"op": gw.HEARTBEAT}),
        text(publish(2)),
        masked(Opcode.TEXT, split[:10], fin=False),
        masked(Opcode.PING, b"mid"),
        masked(Opcode.CONT, split[10:]),
        text(publish(4)),
    ]
    # READY, SUBSCRIBED; 5 ACKs and 5 events; HEARTBEAT_ACK; 2 pongs.
    return frames, 2 + 10 + 1 + 2


async def _answers(c: RawWs, count: int) -> list[tuple[int, bytes]]:
    got: list[tuple[int, bytes]] = []
    async with asyncio.timeout(TIMEOUT):
        while len(got) < count:
            got.extend(c.frames())
            if len(got) < count:
                chunk = await c.recv_some()
                assert chunk, f"closed after {got}"
                c.buf += chunk
    return got


def _summary(frames: list[tuple[int, bytes]]) -> list[object]:
    """What the client saw, without the parts that differ between sessions."""
    out: list[object] = []
    for op, payload in frames:
        if op != Opcode.TEXT.value:
            out.append((op, payload))
            continue
        m = orjson.loads(payload)
        if m["op"] == gw.ACK:
            out.append(("ACK", m["d"]["nonce"]))
        elif m["op"] == gw.DISPATCH and m.get("t") == "EV":
            out.append(("EV", m["d"]["i"]))
        else:
            out.append((m["op"], m.get("t")))
    return out


async def _run(server: Server, writes: list[bytes]) -> list[object]:
    c = await RawWs.open(server.port)
    try:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert await c.handshake() == 101
        hello = await c.next_json()
        assert hello["op"] == gw.HELLO
        _, count = _script(server)
        for w in writes:
            await c.sendall(w)
        return _summary(await _answers(c, count))
    finally:
        c.close()


def _check(seen: list[object]) -> list[str]:
    """What must hold whatever the timing: READY first, SUBSCRIBED before
    any event, events and ACKs each in order. Returns the rest (a multiset:
    where the session's own answers fall among the guild's is timing)."""
    assert seen[0] == (gw.DISPATCH, "READY"), seen
    first_event = next(i for i, x in enumerate(seen) if isinstance(x, tuple) and x[0] == "EV")
    assert (gw.DISPATCH, "SUBSCRIBED") in seen[1:first_event], seen
    events = [x for x in seen if isinstance(x, tuple) and x[0] == "EV"]
    acks = [x for x in seen if isinstance(x, tuple) and x[0] == "ACK"]
    assert events == [("EV", i) for i in range(5)], seen
    assert acks == [("ACK", str(i)) for i in range(5)], seen
    return sorted(repr(x) for x in seen if x not in events and x not in acks)


async def test_frames_in_one_read_or_split_get_the_same_answers(server: Server) -> None:
    frames, _ = _script(server)
    rest = _check(await _run(server, frames))
    assert repr((Opcode.PONG.value, b"hi")) in rest
    assert repr((Opcode.PONG.value, b"mid")) in rest
    assert repr((gw.HEARTBEAT_ACK, None)) in rest
    whole = b"".join(frames)
    for writes in (
        [whole],  # all at once
        [whole[i : i + 1] for i in range(len(whole))],  # a byte per write
        [whole[i : i + 7] for i in range(0, len(whole), 7)],  # cut inside headers and payloads
    ):
        assert _check(await _run(server, writes)) == rest


async def test_a_frame_websockets_refuses_after_plain_ones_closes_as_before(
    server: Server,
) -> None:
    """Plain frames are served, then an RSV1 frame without deflate: 1002,
    and nothing after it in the same read is served."""
    frames, _ = _script(server)
    c = await RawWs.open(server.port)
    try:
        assert await c.handshake() == 101
        await c.next_json()  # HELLO
        bad = masked(Opcode.TEXT, b"{}", rsv1=True)
        after = masked(Opcode.TEXT, orjson.dumps({"op": gw.HEARTBEAT}))
        await c.sendall(frames[0] + bad + after)
        code, seen = await c.read_until_close()
        assert code == 1002
        kinds = [orjson.loads(p).get("t") for op, p in seen if op == Opcode.TEXT.value]
        assert kinds[0] == "READY"
        ops = [orjson.loads(p)["op"] for op, p in seen if op == Opcode.TEXT.value]
        assert gw.HEARTBEAT_ACK not in ops
    finally:
        c.close()


async def test_an_incomplete_frame_then_eof_is_websockets_verdict(server: Server) -> None:
    """Half a frame, then the client half-closes: websockets sees the half
    with the EOF and the server closes the connection (no answer to it)."""
    c = await RawWs.open(server.port)
    try:
        assert await c.handshake() == 101
        await c.next_json()  # HELLO
        frame = masked(Opcode.TEXT, orjson.dumps({"op": gw.HEARTBEAT}))
        await c.sendall(frame[: len(frame) // 2])
        c.sock.shutdown(socket.SHUT_WR)
        code, seen = await c.read_until_close()
        assert seen == []
        assert code in (None, 1006)  # 1006 is never sent: EOF is all a client sees
    finally:
        c.close()


async def test_a_large_frame_in_small_reads_is_served(server: Server) -> None:
    """A PUBLISH of about 30 KiB written 100 bytes at a time is put together
    (the held bytes are appended to, not copied per read) and answered."""
    c = await RawWs.open(server.port)
    try:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert await c.handshake() == 101
        await c.next_json()  # HELLO
        tok = server.token("u", pub=["*"])
        ident = {"op": gw.IDENTIFY, "d": {"token": tok, "guilds": {}}}
        await c.sendall(masked(Opcode.TEXT, orjson.dumps(ident)))
        assert (await c.next_json())["t"] == "READY"
        big = {"op": gw.PUBLISH, "d": {"guild": "g", "t": "EV", "d": "x" * 30_000, "nonce": "n"}}
        frame = masked(Opcode.TEXT, orjson.dumps(big))
        for i in range(0, len(frame), 100):
            await c.sendall(frame[i : i + 100])
        ack = await c.next_json()
        assert ack["op"] == gw.ACK and ack["d"]["nonce"] == "n", ack
    finally:
        c.close()
