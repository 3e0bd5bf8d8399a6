"""Client-side WebSocket framing by hand, and the load-test event format.

Owns the bytes the harness puts on the wire and the fast extraction of what
the measure needs from what the server sends back. No asyncio here.

The client half of RFC 6455 is small: an HTTP/1.1 upgrade request, masked
frames out (section 5.3: every client frame carries a fresh 4-byte key) and
unmasked frames in. Masking uses websockets' C ``apply_mask`` when it is
built, so the harness pays the same per-byte cost as a real client.

Event format: every published event is ``t = "LT"`` with
``d = {"ts": <time.time_ns() // 1000 at publish: microseconds>, "pad": "x" * k}``. The server
re-encodes ``d`` with orjson, which keeps key order, and a guild DISPATCH is
always ``{"op":0,"t":"LT","g":GID,"s":S,"d":{"ts":TS,...`` (see
``server/protocol/wire.py`` and PROTOCOL.md "Envelope"), so ``g``, ``s`` and
``ts`` sit at offsets found with two ``bytes.find`` calls and no JSON parse.
Anything that does not match that prefix takes the slow path (a full
``orjson.loads``), so a server that orders keys differently is still
measured correctly, only more slowly.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import time
from typing import Any

import orjson

try:
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - pure-Python websockets build
    from websockets.utils import apply_mask

#: Event name of every load-test event (PROTOCOL.md: ``[A-Z0-9_]{1,64}``).
EVENT = "LT"
#: The bytes a fast-path DISPATCH starts with, up to the guild id.
DISPATCH_PREFIX = b'{"op":0,"t":"' + EVENT.encode() + b'","g":"'
#: From the guild id's closing quote to the first digit of ``s``: ``","s":``.
GID_TO_S = 6
#: From the comma after ``s`` to the first digit of ``ts``: ``,"d":{"ts":``.
S_TO_TS = 11
#: The publish time in microseconds has 16 digits from 2001 to 2286.
TS_DIGITS = 16
#: Bytes of ``d`` that are not padding: ``{"ts":1234567890123456,"pad":""}``.
D_OVERHEAD = 32

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def pad_for(size: int) -> bytes:
    """The ``pad`` string that makes ``d`` about ``size`` bytes of JSON."""
    return b"x" * max(0, size - D_OVERHEAD)


def event_data(ts: int, pad: bytes) -> bytes:
    """The JSON of one event's ``d``; ``ts`` in microseconds since the epoch."""
    return b'{"ts":' + str(ts).encode() + b',"pad":"' + pad + b'"}'


def publish_payload(gid: bytes, ts: int, pad: bytes, nonce: bytes | None = None) -> bytes:
    """A PUBLISH (op 5) of one load-test event (PROTOCOL.md "Opcodes"); ``ts`` in us."""
    tail = b',"nonce":"' + nonce + b'"}}' if nonce is not None else b"}}"
    return (
        b'{"op":5,"d":{"guild":"'
        + gid
        + b'","t":"'
        + EVENT.encode()
        + b'","d":'
        + event_data(ts, pad)
        + tail
    )


def handshake_request(host: str, port: int, path: str) -> tuple[bytes, bytes]:
    """The HTTP upgrade request (RFC 6455 section 4.1) and the expected accept value."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
    req = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\nUser-Agent: guildcast-loadtest\r\n\r\n"
    ).encode()
    return req, accept


def check_handshake(head: bytes, accept: bytes) -> str | None:
    """None if ``head`` (the response up to the blank line) accepts the upgrade,
    else a short reason."""
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.1 101"):
        return "upgrade refused: " + lines[0].decode("latin-1")[:80]
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-accept":
            if value.strip() == accept:
                return None
            return "bad Sec-WebSocket-Accept"
    return "no Sec-WebSocket-Accept"


def mint(secret: str, sub: str, guilds: list[str], pub: list[str], pub_rate: float | None) -> str:
    """An HS256 token as PROTOCOL.md "Tokens" describes (valid for one day)."""
    import jwt

    claims: dict[str, Any] = {"sub": sub, "guilds": guilds, "pub": pub}
    if pub_rate is not None:
        claims["pub_rate"] = pub_rate
    claims["exp"] = int(time.time()) + 24 * 3600
    return jwt.encode(claims, secret, algorithm="HS256")


def _mask_key() -> bytes:
    return random.getrandbits(32).to_bytes(4, "big")


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame (RFC 6455 section 5.2)."""
    n = len(payload)
    b0 = 0x80 | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = bytes((b0, 0xFE)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, 0xFF)) + n.to_bytes(8, "big")
    key = _mask_key()
    return head + key + apply_mask(payload, key)


def text(payload: bytes) -> bytes:
    return client_frame(OP_TEXT, payload)


def close_frame(code: int, reason: str = "") -> bytes:
    return client_frame(OP_CLOSE, code.to_bytes(2, "big") + reason.encode()[:120])


def message(op: int, d: Any) -> bytes:
    """A framed client message ``{"op": op, "d": d}``."""
    return text(orjson.dumps({"op": op, "d": d}))


HEARTBEAT = b'{"op":1,"d":null}'


def parse_frames(
    buf: bytes, start: int = 0
) -> tuple[list[tuple[int, bool, bytes]], int, str | None]:
    """Split ``buf[start:]`` into ``(opcode, fin, payload)`` frames.

    Returns the frames, the index of the first unconsumed byte, and an error
    if the server sent a masked frame (RFC 6455 section 5.1 forbids it).
    Used by the slow paths; the subscriber's hot loop inlines the same steps.
    """
    out: list[tuple[int, bool, bytes]] = []
    i, n = start, len(buf)
    while n - i >= 2:
        b1 = buf[i + 1]
        if b1 & 0x80:
            return out, i, "masked server frame"
        ln = b1 & 0x7F
        hl = 2
        if ln == 126:
            if n - i < 4:
                break
            ln = int.from_bytes(buf[i + 2 : i + 4], "big")
            hl = 4
        elif ln == 127:
            if n - i < 10:
                break
            ln = int.from_bytes(buf[i + 2 : i + 10], "big")
            hl = 10
        end = i + hl + ln
        if end > n:
            break
        b0 = buf[i]
        out.append((b0 & 0x0F, bool(b0 & 0x80), buf[i + hl : end]))
        i = end
    return out, i, None


def fast_ack_s(payload: bytes) -> int | None:
    """``s`` of an ACK ``{"op":12,"d":{"g":..,"s":N,...}}`` without a JSON parse."""
    if not payload.startswith(b'{"op":12,'):
        return None
    i = payload.find(b'"s":')
    if i < 0:
        return None
    j = i + 4
    k = j
    n = len(payload)
    while k < n and 48 <= payload[k] <= 57:
        k += 1
    return int(payload[j:k]) if k > j else None
