"""WebSocket frames (RFC 6455 section 5), both directions, Sans-I/O.

The one frame builder and parser of the project: the server's guild actors
frame each event once with :func:`text_frame`; the harness (``loadtest/``)
and the tests build masked client frames with :func:`client_frame` and split
what a server sends with :func:`scan_frames` / :func:`parse_frames`. The
gateway itself reads client frames with websockets' ``ServerProtocol``, so no
masked-frame parser is needed here. ``tests/protocol/test_frames.py`` checks
both directions against websockets' own implementation.

Server frames are unmasked (section 5.1), so one ``bytes`` object can go to
any connection; client frames carry a fresh 4-byte masking key each (section
5.3). Masking uses websockets' C ``apply_mask`` when it is built.

Consistency model: pure functions of their arguments (the masking key is
drawn from :mod:`random` unless given); no state, no I/O.
"""

from __future__ import annotations

import random

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - pure-Python websockets build
    from websockets.utils import apply_mask

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "Frame",
    "FrameParser",
    "apply_mask",
    "client_frame",
    "close_code",
    "close_payload",
    "frame_header",
    "parse_frames",
    "scan_frames",
    "server_frame",
    "text_frame",
]

#: Frame opcodes (RFC 6455 section 5.2).
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
#: A close frame without a status code reports 1005 (RFC 6455 section 7.1.5).
NO_STATUS = 1005
#: Control frame payloads are at most 125 bytes (section 5.5); a close
#: reason gets what is left after the 2-byte code.
_MAX_REASON = 123

#: One parsed frame: ``(opcode, fin, payload)``.
Frame = tuple[int, bool, bytes]


def frame_header(
    opcode: int, length: int, *, fin: bool = True, rsv: int = 0, masked: bool = False
) -> bytes:
    """The 2-14 header bytes before a frame's masking key and payload.

    ``length`` is the announced payload length (a test may announce a wrong
    one); ``rsv`` the 3 reserved bits; ``masked`` sets the MASK bit (the
    caller appends the key).
    """
    b0 = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)
    m = 0x80 if masked else 0
    if length < 126:
        return bytes((b0, m | length))
    if length < 65536:
        return bytes((b0, m | 126)) + length.to_bytes(2, "big")
    return bytes((b0, m | 127)) + length.to_bytes(8, "big")


def text_frame(payload: bytes) -> bytes:
    """One unmasked, final text frame holding ``payload``: the server's hot path."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


def server_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """One unmasked frame, as a server sends it."""
    return frame_header(opcode, len(payload), fin=fin) + payload


def client_frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, key: bytes | None = None
) -> bytes:
    """One masked frame, as a client sends it; ``key`` defaults to a random one."""
    if key is None:
        key = random.getrandbits(32).to_bytes(4, "big")
    head = frame_header(opcode, len(payload), fin=fin, rsv=rsv, masked=True)
    return head + key + apply_mask(payload, key)


def close_payload(code: int, reason: str = "") -> bytes:
    """The payload of a close frame: the code, then at most 123 bytes of reason."""
    return code.to_bytes(2, "big") + reason.encode()[:_MAX_REASON]


def close_code(payload: bytes) -> tuple[int, str]:
    """``(code, reason)`` of a close frame's payload; 1005 when it has no code."""
    if len(payload) < 2:
        return NO_STATUS, ""
    return int.from_bytes(payload[:2], "big"), payload[2:].decode("utf-8", "replace")


def scan_frames(
    buf: bytes | bytearray, start: int = 0, limit: int | None = None
) -> tuple[list[tuple[int, int, int]], int, str | None]:
    """Locate the complete unmasked (server) frames in ``buf[start:]``.

    Returns ``(spans, end, error)``: one ``(first byte, payload start,
    payload end)`` per frame, so a caller can read fields in place without a
    copy; ``end`` is the first byte not consumed (a partial frame stays for
    the next read); ``error`` is set, and scanning stops, at a masked frame
    (a server must not mask, section 5.1). At most ``limit`` frames.
    """
    out: list[tuple[int, int, int]] = []
    i, n = start, len(buf)
    room = -1 if limit is None else limit
    while n - i >= 2 and room != 0:
        ln = buf[i + 1]
        if ln < 126:
            p = i + 2
        elif ln == 126:
            if n - i < 4:
                break
            ln = (buf[i + 2] << 8) | buf[i + 3]
            p = i + 4
        elif ln == 127:
            if n - i < 10:
                break
            ln = int.from_bytes(buf[i + 2 : i + 10], "big")
            p = i + 10
        else:
            return out, i, "masked server frame"
        end = p + ln
        if end > n:
            break
        out.append((buf[i], p, end))
        i = end
        room -= 1
    return out, i, None


def parse_frames(
    buf: bytes | bytearray, start: int = 0, limit: int | None = None
) -> tuple[list[Frame], int, str | None]:
    """Like :func:`scan_frames`, with each frame as ``(opcode, fin, payload)``."""
    spans, end, err = scan_frames(buf, start, limit)
    return [(b0 & 0x0F, bool(b0 & 0x80), bytes(buf[p:q])) for b0, p, q in spans], end, err


class FrameParser:
    """An incremental parser of server frames: feed bytes as they arrive.

    Bound: it holds at most one partial frame (what a server announced; the
    server bounds its frames). A masked frame is an error: :attr:`error` is
    set and every later :meth:`feed` returns nothing.
    """

    __slots__ = ("_rest", "error")

    def __init__(self) -> None:
        self._rest = b""
        #: Why parsing stopped, or None.
        self.error: str | None = None

    def feed(self, data: bytes) -> list[Frame]:
        """The frames completed by ``data``, in order."""
        if self.error is not None:
            return []
        buf = self._rest + data if self._rest else data
        frames, end, self.error = parse_frames(buf)
        self._rest = buf[end:] if self.error is None else b""
        return frames

    @property
    def buffered(self) -> int:
        """Bytes held of a frame not yet complete."""
        return len(self._rest)
