"""Test helper: split a byte stream of unmasked server frames into JSON messages.

The splitting is the protocol package's own (``guildcast.protocol.frames``),
which tests/protocol/test_frames.py checks against websockets' independent
implementation; on top, this asserts what a server must never send.
"""

from __future__ import annotations

from typing import Any

import orjson

from guildcast.protocol.frames import scan_frames


def unframe(data: bytes | bytearray) -> list[dict[str, Any]]:
    """Every complete text frame in ``data`` as a decoded JSON object.

    Raises AssertionError on anything a server must not send (masked or
    non-final frames, non-text opcodes, a truncated frame).
    """
    buf = bytes(data)
    spans, end, err = scan_frames(buf)
    assert err is None, "server frames must not be masked"
    for b0, _, _ in spans:
        assert b0 == 0x81, f"expected FIN + TEXT, got {b0:#x}"
    assert end == len(buf), "truncated frame"
    return [orjson.loads(buf[p:q]) for _, p, q in spans]


def one(data: bytes | bytearray) -> dict[str, Any]:
    """The single message framed in ``data``."""
    msgs = unframe(data)
    assert len(msgs) == 1, msgs
    return msgs[0]
