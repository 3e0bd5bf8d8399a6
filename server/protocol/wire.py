"""Envelope codec and server-side WebSocket text framing: the only user of orjson.

Encoding happens once per event per node (DESIGN.md, hot-path rule 1): the
guild actor calls :func:`dispatch_frame` and every recipient gets the same
bytes. Server frames are unmasked (RFC 6455 section 5.1), so a frame is just a
header and the payload, and one ``bytes`` object can go to any connection.
"""

from __future__ import annotations

import re
from typing import Any, TypeGuard

import orjson

from guildcast.protocol.codes import Op

JSONDecodeError = orjson.JSONDecodeError

#: PROTOCOL.md, "Envelope": guild ids and event names.
_GUILD_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_EVENT_RE = re.compile(r"[A-Z0-9_]{1,64}")


def valid_guild(gid: object) -> TypeGuard[str]:
    """True if ``gid`` is a string of 1-128 characters of ``[A-Za-z0-9_.:-]``."""
    return type(gid) is str and _GUILD_RE.fullmatch(gid) is not None


def valid_event(t: object) -> TypeGuard[str]:
    """True if ``t`` is a string of 1-64 characters of ``[A-Z0-9_]``."""
    return type(t) is str and _EVENT_RE.fullmatch(t) is not None


def decode(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse one JSON document; raises :data:`JSONDecodeError` on bad JSON or UTF-8."""
    return orjson.loads(data)


def encode(obj: Any) -> bytes:
    """Serialise ``obj`` as compact UTF-8 JSON."""
    return orjson.dumps(obj)


def text_frame(payload: bytes) -> bytes:
    """One unmasked, final text frame holding ``payload`` (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload


def dispatch_payload(gid: str, t: str, s: int, d: Any) -> bytes:
    """The JSON of a guild DISPATCH (PROTOCOL.md, "Envelope")."""
    return orjson.dumps({"op": 0, "t": t, "g": gid, "s": s, "d": d})


def message(op: int, d: Any = None, t: str | None = None, g: str | None = None) -> bytes:
    """A framed non-guild-event message (HELLO, READY, ACK, ERROR, ...)."""
    obj: dict[str, Any] = {"op": op, "d": d}
    if t is not None:
        obj["t"] = t
    if g is not None:
        obj["g"] = g
    return text_frame(orjson.dumps(obj))


def subscribed_frame(gid: str, epoch: str, head: int, recovered: bool) -> bytes:
    """PROTOCOL.md, "Subscribing and recovery", step 1."""
    return message(
        Op.DISPATCH, {"epoch": epoch, "s": head, "recovered": recovered}, t="SUBSCRIBED", g=gid
    )


def unsubscribed_frame(gid: str) -> bytes:
    """The answer to UNSUBSCRIBE (PROTOCOL.md, "Subscribing and recovery")."""
    return message(Op.DISPATCH, None, t="UNSUBSCRIBED", g=gid)


HEARTBEAT_ACK_FRAME = message(Op.HEARTBEAT_ACK)
RECONNECT_FRAME = message(Op.RECONNECT)
