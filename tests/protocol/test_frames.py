"""The protocol package's frame builder and parser (guildcast.protocol.frames)
against websockets' own Sans-I/O implementation, an independent one: what
we build, websockets reads back; what websockets sends, we read back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, Side, State

from guildcast.protocol import frames as fr

SIZES = [0, 1, 125, 126, 127, 65535, 65536, 70000]


def peer(side: Side) -> Protocol:
    """An open websockets connection end that accepts any frame size."""
    return Protocol(side, state=State.OPEN, max_size=None)


def received(p: Protocol) -> list[Frame]:
    """The frames ``p`` has parsed (an open connection yields nothing else)."""
    events = p.events_received()
    assert all(isinstance(e, Frame) for e in events)
    return [e for e in events if isinstance(e, Frame)]


def payload(n: int) -> bytes:
    return bytes((i * 7 + 3) % 256 for i in range(n))


@pytest.mark.parametrize("n", SIZES)
def test_client_frames_are_read_by_a_websockets_server(n: int) -> None:
    server = peer(Side.SERVER)
    data = payload(n)
    server.receive_data(fr.client_frame(fr.OP_BINARY, data) + fr.client_frame(fr.OP_PING, b"hi"))
    got = received(server)
    assert [(f.opcode, f.fin, f.data) for f in got] == [
        (Opcode.BINARY, True, data),
        (Opcode.PING, True, b"hi"),
    ]
    assert server.parser_exc is None


def test_client_frame_with_a_given_key() -> None:
    key = b"\x01\x02\x03\x04"
    frame = fr.client_frame(fr.OP_TEXT, b"hello", key=key)
    assert frame[:2] == bytes((0x81, 0x85)) and frame[2:6] == key
    assert bytes(b ^ key[i % 4] for i, b in enumerate(frame[6:])) == b"hello"  # RFC 6455 5.3


def test_fragmented_client_message_and_close() -> None:
    server = peer(Side.SERVER)
    server.receive_data(
        fr.client_frame(fr.OP_TEXT, b'{"op":', fin=False)
        + fr.client_frame(fr.OP_PING, b"")
        + fr.client_frame(fr.OP_CONT, b"1}")
        + fr.client_frame(fr.OP_CLOSE, fr.close_payload(4000, "bye"))
    )
    got = received(server)
    assert [(f.opcode, f.fin, f.data) for f in got] == [
        (Opcode.TEXT, False, b'{"op":'),
        (Opcode.PING, True, b""),
        (Opcode.CONT, True, b"1}"),
        (Opcode.CLOSE, True, b"\x0f\xa0bye"),
    ]
    assert server.close_rcvd is not None and server.close_rcvd.code == 4000


@pytest.mark.parametrize("n", SIZES)
def test_server_frames_from_websockets_are_parsed(n: int) -> None:
    server = peer(Side.SERVER)
    data = payload(n)
    server.send_binary(data)
    server.send_text(b"txt", fin=False)
    server.send_continuation(b"!", fin=True)
    server.send_close(1001, "going")
    wire_bytes = b"".join(server.data_to_send())
    frames, end, err = fr.parse_frames(wire_bytes)
    assert err is None and end == len(wire_bytes)
    assert frames == [
        (fr.OP_BINARY, True, data),
        (fr.OP_TEXT, False, b"txt"),
        (fr.OP_CONT, True, b"!"),
        (fr.OP_CLOSE, True, fr.close_payload(1001, "going")),
    ]
    assert fr.close_code(frames[-1][2]) == (1001, "going")


@pytest.mark.parametrize("n", SIZES)
def test_our_server_frames_are_read_by_a_websockets_client(n: int) -> None:
    client = peer(Side.CLIENT)
    data = payload(n)
    client.receive_data(fr.text_frame(data) + fr.server_frame(fr.OP_PONG, b"p"))
    assert [(f.opcode, f.data) for f in received(client)] == [
        (Opcode.TEXT, data),
        (Opcode.PONG, b"p"),
    ]
    assert fr.text_frame(data) == fr.server_frame(fr.OP_TEXT, data)


def test_a_masked_server_frame_is_an_error() -> None:
    client = peer(Side.CLIENT)
    client.send_text(b"masked")
    masked = b"".join(client.data_to_send())
    frames, end, err = fr.parse_frames(fr.text_frame(b"ok") + masked)
    assert frames == [(fr.OP_TEXT, True, b"ok")] and end == 4 and err == "masked server frame"
    p = fr.FrameParser()
    assert p.feed(masked) == [] and p.error == "masked server frame"
    assert p.feed(fr.text_frame(b"later")) == []


def test_close_payload_edges() -> None:
    assert fr.close_code(b"") == (1005, "")
    assert len(fr.close_payload(1000, "x" * 500)) == 125  # a control frame's limit


def test_scan_limit_and_partial_frames() -> None:
    stream = fr.text_frame(b"a") + fr.text_frame(b"bb") + fr.text_frame(b"c" * 300)[:-1]
    spans, end, err = fr.scan_frames(stream, limit=1)
    assert [stream[p:q] for _, p, q in spans] == [b"a"] and end == 3 and err is None
    frames, end, _ = fr.parse_frames(stream, end)
    assert [f[2] for f in frames] == [b"bb"] and end == 7


@given(
    messages=st.lists(st.binary(max_size=300) | st.sampled_from([b"x" * 70000]), max_size=8),
    cuts=st.lists(st.integers(0, 80000), max_size=6),
)
def test_incremental_parser_in_any_chunking(messages: list[bytes], cuts: list[int]) -> None:
    server = peer(Side.SERVER)
    for m in messages:
        server.send_binary(m)
    stream = b"".join(server.data_to_send())
    points = sorted({c % (len(stream) + 1) for c in cuts})
    p = fr.FrameParser()
    got: list[bytes] = []
    for a, b in zip([0, *points], [*points, len(stream)], strict=True):
        got.extend(f[2] for f in p.feed(stream[a:b]))
    assert got == messages and p.buffered == 0 and p.error is None
