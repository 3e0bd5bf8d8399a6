"""The client frames the gateway reads itself: a complete, unfragmented,
masked text frame (the shape of every IDENTIFY, PUBLISH and HEARTBEAT a
client sends) on an OPEN connection is unmasked here and handed to the
session without websockets' frame parser, whose generators cost about
5 us a frame against 1 us here (docs/BENCHMARKS.md, issue 14).

Everything else is still websockets' to parse, and it always gets whole
frames, so its parser is at a frame boundary whenever this module looks at
the next one: :func:`next_frame` says what the frame at ``pos`` is:

- :data:`TEXT`: complete, ``FIN`` set, no ``RSV`` bit, opcode 1, masked, at
  most ``max_size`` bytes: the gateway takes it.
- :data:`WHOLE`: complete and at most ``max_size``, anything else (control
  frames, fragments, binary, ``RSV`` bits, a bad opcode): websockets parses
  it (and answers or refuses it) exactly as before.
- :data:`PARTIAL`: not all here yet; the gateway keeps the bytes (at most
  the frame: a header and ``max_size``) until the rest comes.
- :data:`HANDOVER`: unmasked, or longer than ``max_size``: websockets fails
  the connection on reading its header (1002, 1009), so it gets these
  bytes and everything after them, and the gateway reads no more frames
  itself on that connection.

A text frame's ``max_size`` is websockets' (``max_frame``) for a message
that is not fragmented; fragments are websockets' (WHOLE), and so is every
frame while a fragmented message is in progress (the gateway's caller
checks). websockets does not check UTF-8 in text frames; neither does
this module (the session's JSON decoding does). Pure functions; no state.
"""

from __future__ import annotations

try:  # websockets' C unmasking, as its own frame parser uses it
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - a websockets built without it
    from websockets.utils import apply_mask

#: What :func:`next_frame` found at ``pos``.
TEXT = 0
WHOLE = 1
PARTIAL = 2
HANDOVER = 3

#: FIN, no RSV bit, opcode 1 (text).
_FIN_TEXT = 0x81
_MASKED = 0x80


def next_frame(data: bytes | bytearray, pos: int, max_size: int) -> tuple[int, int, int]:
    """``(kind, end, payload)`` of the frame starting at ``pos`` in ``data``:
    its kind (above), where it ends and where its masking key starts (both
    meaningful for TEXT and WHOLE only)."""
    n = len(data)
    if pos + 2 > n:
        return PARTIAL, 0, 0
    b1 = data[pos + 1]
    if not b1 & _MASKED:
        return HANDOVER, 0, 0
    length = b1 & 0x7F
    head = pos + 2
    if length == 126:
        if head + 2 > n:
            return PARTIAL, 0, 0
        length = int.from_bytes(data[head : head + 2], "big")
        head += 2
    elif length == 127:
        if head + 8 > n:
            return PARTIAL, 0, 0
        length = int.from_bytes(data[head : head + 8], "big")
        head += 8
    if length > max_size:
        return HANDOVER, 0, 0
    end = head + 4 + length
    if end > n:
        return PARTIAL, 0, 0
    return (TEXT if data[pos] == _FIN_TEXT else WHOLE), end, head


def unmask(data: bytes | bytearray, key_at: int, end: int) -> bytes:
    """The payload of the TEXT frame whose masking key starts at ``key_at``."""
    return apply_mask(data[key_at + 4 : end], data[key_at : key_at + 4])
