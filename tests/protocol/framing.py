"""Test helper: split a byte stream of unmasked server frames into JSON messages.

Written from RFC 6455 section 5.2, independently of ``guildcast.protocol.wire``,
so the unit tests check the server's framing instead of trusting it.
"""

from __future__ import annotations

from typing import Any

import orjson


def unframe(data: bytes | bytearray) -> list[dict[str, Any]]:
    """Every complete text frame in ``data`` as a decoded JSON object.

    Raises AssertionError on anything a server must not send (masked or
    non-final frames, non-text opcodes, a truncated frame).
    """
    out: list[dict[str, Any]] = []
    i = 0
    n = len(data)
    while i < n:
        assert n - i >= 2, "truncated frame header"
        b0, b1 = data[i], data[i + 1]
        assert b0 == 0x81, f"expected FIN + TEXT, got {b0:#x}"
        assert b1 & 0x80 == 0, "server frames must not be masked"
        length = b1 & 0x7F
        i += 2
        if length == 126:
            length = int.from_bytes(data[i : i + 2], "big")
            i += 2
        elif length == 127:
            length = int.from_bytes(data[i : i + 8], "big")
            i += 8
        assert n - i >= length, "truncated frame payload"
        out.append(orjson.loads(bytes(data[i : i + length])))
        i += length
    return out


def one(data: bytes | bytearray) -> dict[str, Any]:
    """The single message framed in ``data``."""
    msgs = unframe(data)
    assert len(msgs) == 1, msgs
    return msgs[0]
