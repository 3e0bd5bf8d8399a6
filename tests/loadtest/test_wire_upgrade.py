"""The harness's upgrade (guildcast.loadtest.wire.Upgrade, websockets'
ClientProtocol) against websockets' own Sans-I/O server, and the fast-path
offsets against the server's envelope builder."""

from __future__ import annotations

from websockets.protocol import Protocol, Side, State
from websockets.server import ServerProtocol

from guildcast.loadtest import wire
from guildcast.protocol import frames
from guildcast.protocol import wire as pw


def serve(request: bytes, status: int | None = None) -> bytes:
    server = ServerProtocol()
    server.receive_data(request)
    (req,) = server.events_received()
    assert req.headers["User-Agent"] == "guildcast-loadtest"  # type: ignore[union-attr]
    if status is None:
        response = server.accept(req)  # type: ignore[arg-type]
    else:
        response = server.reject(status, "no")
    server.send_response(response)
    return b"".join(server.data_to_send())


def test_upgrade_accepted_in_pieces_keeps_the_following_frames() -> None:
    up = wire.Upgrade("127.0.0.1", 9, "/gateway")
    first = frames.text_frame(b'{"op":10,"d":{"heartbeat_interval":30000}}')
    data = serve(up.request) + first
    for i in range(len(data) - len(first) - 1):
        assert up.receive(data[i : i + 1]) == (False, None, b"")
    assert up.receive(data[len(data) - len(first) - 1 :]) == (True, None, first)


def test_upgrade_refused_or_forged() -> None:
    up = wire.Upgrade("127.0.0.1", 9, "/nope")
    done, err, _ = up.receive(serve(up.request, 404))
    assert done and err is not None and err.startswith("upgrade refused")
    up = wire.Upgrade("::1", 9, "/gateway")
    other = wire.Upgrade("::1", 9, "/gateway")
    done, err, _ = up.receive(serve(other.request))  # another key's accept value
    assert done and err is not None and "Sec-WebSocket-Accept" in err


def test_fast_path_offsets_and_messages() -> None:
    payload = pw.dispatch_payload("room-7", wire.EVENT, 1234, {"ts": 10**15, "pad": "xx"})
    assert payload.startswith(wire.DISPATCH_PREFIX)
    q = payload.index(b'"', len(wire.DISPATCH_PREFIX))
    assert payload[len(wire.DISPATCH_PREFIX) : q] == b"room-7"
    se = payload.index(b",", q + wire.GID_TO_S)
    assert payload[q + wire.GID_TO_S : se] == b"1234"
    assert payload[se + wire.S_TO_TS : se + wire.S_TO_TS + wire.TS_DIGITS] == b"1" + b"0" * 15
    assert len(wire.event_data(10**15, wire.pad_for(100))) == 100
    ack = pw.message(12, {"g": "g", "s": 77, "epoch": "e", "nonce": "1"})
    assert wire.fast_ack_s(frames.parse_frames(ack)[0][0][2]) == 77
    server = Protocol(Side.SERVER, state=State.OPEN)
    server.receive_data(wire.close_frame(1000, "bye"))
    assert server.close_rcvd is not None
    assert (server.close_rcvd.code, server.close_rcvd.reason) == (1000, "bye")
