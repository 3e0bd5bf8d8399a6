"""The shared compressor (server/protocol/deflate.py), checked against
websockets' own permessage-deflate decoder: every compressed message
inflates on its own (no context takeover) and with a decoder that keeps its
context (a client that asked for context takeover), to exactly its input."""

from __future__ import annotations

import zlib

from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import Frame, Opcode

from guildcast.protocol.deflate import DEFAULT_THRESHOLD, RSV1, Deflater, payload_of
from guildcast.protocol.frames import OP_PING, scan_frames, server_frame, text_frame

#: JSON-like payloads: compressible text of any length around the threshold,
#: and incompressible bytes (which must go out uncompressed).
payloads = st.one_of(
    st.text(alphabet='{}":,abcdefgh0123456789 ', max_size=6000).map(str.encode),
    st.binary(max_size=600),
)


def _decoders() -> tuple[PerMessageDeflate, PerMessageDeflate]:
    """A client's decoder without, and with, context takeover (RFC 7692)."""
    fresh = PerMessageDeflate(True, False, 15, 15)
    keeping = PerMessageDeflate(False, False, 15, 15)
    return fresh, keeping


def _raw(data: bytes) -> list[tuple[int, bool, bytes]]:
    """``(first byte, fin, payload)`` of every frame in ``data`` (all whole)."""
    spans, end, err = scan_frames(data)
    assert err is None and end == len(data)
    return [(b0, bool(b0 & 0x80), data[p:q]) for b0, p, q in spans]


def _decode(ext: PerMessageDeflate, data: bytes) -> list[bytes]:
    """What a websockets client with ``ext`` negotiated reads from ``data``."""
    out: list[bytes] = []
    for b0, fin, payload in _raw(data):
        frame = Frame(Opcode(b0 & 0x0F), payload, fin=fin, rsv1=bool(b0 & RSV1))
        out.append(ext.decode(frame).data)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(payloads, max_size=20), st.sampled_from([0, 64, DEFAULT_THRESHOLD, 1024]))
def test_every_message_inflates_alone_to_its_input(msgs: list[bytes], threshold: int) -> None:
    z = Deflater(threshold)
    fresh, keeping = _decoders()
    one_by_one = b"".join(z.text(m) for m in msgs)
    framed = b"".join(text_frame(m) for m in msgs)
    reframed = z.frames(framed)
    shared = b"".join(z.frame(text_frame(m)) for m in msgs)
    for data in (one_by_one, reframed, shared):
        assert _decode(fresh, data) == msgs
        assert _decode(keeping, data) == msgs
    assert one_by_one == reframed == shared
    for (b0, _, payload), m in zip(_raw(one_by_one), msgs, strict=True):
        if b0 & RSV1:  # compressed: at the threshold, and smaller for it
            assert len(m) >= threshold and len(payload) < len(m)
        else:
            assert payload == m


def test_a_message_never_refers_to_the_one_before() -> None:
    """The same bytes twice: the second compresses exactly as the first
    (a compressor keeping its context would emit a back-reference)."""
    z = Deflater()
    msg = b'{"op":0,"t":"MESSAGE_CREATE","d":{"text":"' + b"hello world " * 40 + b'"}}'
    a, b = z.text(msg), z.text(msg)
    assert a == b and a[0] == 0xC1
    body = payload_of(a)
    assert zlib.decompressobj(-15).decompress(body + b"\x00\x00\xff\xff") == msg
    assert z.compressed == 2 and z.bytes_in == 2 * len(msg) and z.bytes_out == 2 * len(body)


def test_small_runs_and_control_frames_pass_unchanged() -> None:
    z = Deflater()
    small = text_frame(b'{"op":11,"d":null}')
    assert z.frames(small) is small
    ping = server_frame(OP_PING, b"x" * 100)
    big = text_frame(b"a" * 500)
    out = z.frames(ping + big)
    assert out.startswith(ping) and out[len(ping)] == 0xC1
    assert z.compressed == 1
