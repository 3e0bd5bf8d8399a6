"""Envelope codec and the id/event-name grammar: the only user of orjson.

Encoding happens once per event per node (docs/DESIGN.md, hot-path rule 1): the
broker builds each event's JSON once with :func:`dispatch_payload` (the Redis
broker's Lua script writes the same bytes), the guild actor frames it once
(:func:`text_frame`, from :mod:`guildcast.protocol.frames`) and every
recipient gets the same bytes. The client-side messages (IDENTIFY, SUBSCRIBE,
PUBLISH, ...) are built in :mod:`guildcast.protocol.client`.

Numbers are kept exactly: orjson handles integers of up to 64 bits and
turns bigger ones into floats when it reads them, and refuses them when it
writes. :func:`decode` therefore reads a document holding a run of 19 or
more digits (the only place such an integer can hide) again with the
standard library, whose integers are exact, and :func:`encode` writes an
object holding one with the standard library: ``d`` reaches subscribers as
the publisher wrote it (docs/PROTOCOL.md, "Messages").
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple, TypeGuard

import orjson

from guildcast.protocol.codes import ACTIVITY_EVENT, Op
from guildcast.protocol.frames import text_frame

__all__ = [
    "EVENT_PATTERN",
    "EVENT_RULE",
    "FROM_NOW",
    "GUILD_PATTERN",
    "GUILD_RULE",
    "HEARTBEAT_ACK_FRAME",
    "IDEMPOTENCY_KEY_PATTERN",
    "IDEMPOTENCY_KEY_RULE",
    "MAX_EPOCH",
    "RECONNECT_FRAME",
    "GuildRequest",
    "JSONDecodeError",
    "activity_batch_frame",
    "activity_entry",
    "activity_frame",
    "decode",
    "dispatch_json",
    "dispatch_payload",
    "encode",
    "guild_request",
    "message",
    "presence_snapshot_frame",
    "subscribed_frame",
    "text_frame",
    "unsubscribed_frame",
    "valid_event",
    "valid_guild",
    "valid_idempotency_key",
]

JSONDecodeError = orjson.JSONDecodeError

#: PROTOCOL.md, "Messages": guild ids and event names, as regexes that mean
#: the same in Python and ECMA-262 (the OpenAPI document's patterns).
GUILD_PATTERN = "[A-Za-z0-9_.:-]{1,128}"
EVENT_PATTERN = "[A-Z0-9_]{1,64}"
#: The grammar in words, for error messages (the gateway's ERROR, the HTTP
#: API's 400, the clients' ValueError all say the same). Both are
#: case-sensitive; event names are upper case only (PROTOCOL.md "Messages"
#: says why).
GUILD_RULE = "1-128 characters of [A-Za-z0-9_.:-]"
EVENT_RULE = "1-64 characters of [A-Z0-9_] (upper case)"
_GUILD_RE = re.compile(GUILD_PATTERN)
_EVENT_RE = re.compile(EVENT_PATTERN)
#: PROTOCOL.md "Idempotent publish" (1.1): a publish's idempotency key is
#: 1-128 visible ASCII characters (``!`` to ``~``: no space, no control
#: character), so a UUID, a hex or base64 digest or an order id fit, and
#: a key is safe in logs, in an HTTP header and as a Redis hash field.
IDEMPOTENCY_KEY_PATTERN = "[!-~]{1,128}"
IDEMPOTENCY_KEY_RULE = "1-128 visible ASCII characters ([!-~], no space)"
_KEY_RE = re.compile(IDEMPOTENCY_KEY_PATTERN)


def valid_guild(gid: object) -> TypeGuard[str]:
    """True if ``gid`` is a string of 1-128 characters of ``[A-Za-z0-9_.:-]``."""
    return type(gid) is str and _GUILD_RE.fullmatch(gid) is not None


def valid_event(t: object) -> TypeGuard[str]:
    """True if ``t`` is a string of 1-64 characters of ``[A-Z0-9_]``."""
    return type(t) is str and _EVENT_RE.fullmatch(t) is not None


#: Longest epoch a Position may name (the server's are 16 hex digits).
MAX_EPOCH = 64


class GuildRequest(NamedTuple):
    """What a session asks of one guild: the value of ``guilds[gid]`` in
    IDENTIFY and SUBSCRIBE (PROTOCOL.md "Messages", "Rewind").

    ``null`` is "from now on"; a Position ``{"epoch", "s"}`` recovers after
    it; (1.1) an object may carry options beside or instead of a Position:
    ``rewind`` (the guild's last N events first, never with a Position) and
    ``passive`` (no events, only GUILD_ACTIVITY notices; with a Position or
    alone, never with a rewind). Parsed in one place, :func:`guild_request`.
    A NamedTuple: immutable and built in a third of a frozen dataclass's
    time (one per guild per IDENTIFY).
    """

    #: ``(epoch, s)`` to recover after, or None.
    position: tuple[str, int] | None = None
    #: 1.1: replay the last this many events before going live (None: no rewind).
    rewind: int | None = None
    #: 1.1: ``"passive": true``: no events, only GUILD_ACTIVITY notices
    #: (PROTOCOL.md "Passive subscriptions").
    passive: bool = False


#: ``null``: from now on, nothing replayed.
FROM_NOW = GuildRequest()

#: Keys (1.1) that make an object without ``epoch``/``s`` a request of its
#: own; an object with none of them and no Position is not a request.
_OPTION_KEYS = ("rewind", "passive")


def guild_request(value: object) -> GuildRequest:
    """Parse one guild's value of IDENTIFY/SUBSCRIBE ``guilds``; ValueError
    (a decode error, close 4002, for the session) says what is wrong.

    Keys the server does not know are ignored, beside a Position as in 1.0.
    """
    if value is None:
        return FROM_NOW
    if type(value) is not dict:
        raise ValueError("a guild's value is null, a Position {epoch, s} or an object of options")
    position: tuple[str, int] | None = None
    epoch, s = value.get("epoch"), value.get("s")
    if epoch is not None or s is not None or not any(k in value for k in _OPTION_KEYS):
        if type(epoch) is not str or len(epoch) > MAX_EPOCH or type(s) is not int or s < 0:
            raise ValueError("a Position is {epoch: str, s: int >= 0}")
        position = (epoch, s)
        if len(value) == 2:  # the 1.0 shape, and the common one
            return GuildRequest(position)
    rewind: int | None = None
    if "rewind" in value:
        r = value["rewind"]
        if type(r) is not int or r < 1:
            raise ValueError("rewind must be a positive integer (events to replay)")
        if position is not None:
            raise ValueError("a guild takes a Position or a rewind, not both")
        rewind = r
    passive = value.get("passive", False)
    if type(passive) is not bool:
        raise ValueError("passive must be true or false")
    if passive and rewind is not None:
        raise ValueError("a passive guild takes no rewind (it receives no events)")
    return GuildRequest(position, rewind, passive)


def valid_idempotency_key(key: object) -> TypeGuard[str]:
    """True if ``key`` is a string of 1-128 characters of ``[!-~]``."""
    return type(key) is str and _KEY_RE.fullmatch(key) is not None


#: 19 digits in a row: the shortest text of an integer orjson may not keep
#: (2**63 has 19 digits); a document without one takes the fast path alone.
#: Found by mapping every digit to "0" and everything else to " " (one C
#: pass, about 0.3 us for a 250-byte PUBLISH; a regex takes 2 us).
_DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_LONG_RUN = b"0" * 19


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # unreachable: orjson refused it first


def decode(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse one JSON document; raises :data:`JSONDecodeError` on bad JSON or UTF-8.

    Integers are exact, whatever their size (the module docstring).
    """
    doc = orjson.loads(data)
    if isinstance(data, str):
        raw: bytes | bytearray = data.encode()
    elif isinstance(data, memoryview):
        raw = data.tobytes()
    else:
        raw = data
    if _LONG_RUN not in raw.translate(_DIGITS_AS_ZERO):
        return doc
    # orjson accepted it, so it is valid JSON and UTF-8: only the numbers differ.
    return json.loads(raw, parse_constant=_reject_constant)


def encode(obj: Any) -> bytes:
    """Serialise ``obj`` as compact UTF-8 JSON; integers of any size are
    written exactly. Raises TypeError for what is not JSON."""
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError as e:
        if "Integer exceeds 64-bit range" not in str(e):
            raise
    try:
        text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError as e:  # NaN or infinity, which orjson writes as null
        raise TypeError(str(e)) from None
    return text.encode()


def dispatch_json(gid: str, t: str, s: int, d_json: bytes) -> bytes:
    """The JSON of a guild DISPATCH (PROTOCOL.md, "Messages"), ``d`` already JSON.

    The one envelope builder: the memory and disk brokers call it and the
    Redis broker's Lua script concatenates the same bytes. ``gid`` and ``t``
    must be valid ids (:func:`valid_guild`, :func:`valid_event`), which need
    no JSON escaping; ``d_json`` is not re-encoded.
    """
    return b'{"op":0,"t":"%s","g":"%s","s":%d,"d":%s}' % (t.encode(), gid.encode(), s, d_json)


def dispatch_payload(gid: str, t: str, s: int, d: Any) -> bytes:
    """:func:`dispatch_json` of ``d`` encoded: the bytes orjson gives the envelope
    ``{"op": 0, "t", "g", "s", "d"}`` for valid ids."""
    return dispatch_json(gid, t, s, orjson.dumps(d))


def message(op: int, d: Any = None, t: str | None = None, g: str | None = None) -> bytes:
    """A framed non-guild-event message (HELLO, READY, ACK, ERROR, ...)."""
    obj: dict[str, Any] = {"op": op, "d": d}
    if t is not None:
        obj["t"] = t
    if g is not None:
        obj["g"] = g
    return text_frame(orjson.dumps(obj))


def subscribed_frame(
    gid: str,
    epoch: str,
    head: int,
    recovered: bool,
    rewound: int | None = None,
    passive: bool = False,
) -> bytes:
    """PROTOCOL.md, "Subscribing and recovering", step 1; ``rewound`` (1.1,
    only in answer to a rewind): the events ``head - rewound + 1 .. head``
    follow; a passive subscription's carries ``"passive": true`` ("Passive
    subscriptions")."""
    d: dict[str, Any] = {"epoch": epoch, "s": head, "recovered": recovered}
    if rewound is not None:
        d["rewound"] = rewound
    if passive:
        d["passive"] = True
    return message(Op.DISPATCH, d, t="SUBSCRIBED", g=gid)


def activity_frame(gid: str, epoch: str, s: int) -> bytes:
    """The GUILD_ACTIVITY notice of a passive subscription (PROTOCOL.md,
    "Passive subscriptions"): guild ``gid``'s head was at least ``s``. Built
    once per guild per notice interval; the same bytes go to every passive
    subscriber. No top-level ``s``: it is not a guild event."""
    return message(Op.DISPATCH, {"s": s, "epoch": epoch}, t=ACTIVITY_EVENT, g=gid)


#: The start of a GUILD_ACTIVITY of several guilds (1.1, IDENTIFY
#: ``activity_batch``): no ``g``; ``d`` maps each guild to its head.
_ACTIVITY_BATCH_START = b'{"op":0,"t":"%s","d":{' % ACTIVITY_EVENT.encode()


def activity_entry(gid: str, s: int) -> bytes:
    """One guild's ``"gid":s`` in :func:`activity_batch_frame`, built once per
    guild per notice interval (a valid guild id needs no JSON escaping)."""
    return b'"%s":%d' % (gid.encode(), s)


def activity_batch_frame(entries: list[bytes]) -> bytes:
    """The GUILD_ACTIVITY of several passive guilds (PROTOCOL.md "Passive
    subscriptions", 1.1 ``activity_batch``): ``{"op":0,"t":"GUILD_ACTIVITY",
    "d":{"g1":s1,"g2":s2,...}}``, one per session per interval, from the
    :func:`activity_entry` bytes shared by every passive subscriber of a
    guild. No ``g`` and no epoch: each guild's is its passive SUBSCRIBED's
    (an epoch change closes the guild's passive sessions with 4000)."""
    return text_frame(_ACTIVITY_BATCH_START + b",".join(entries) + b"}}")


def presence_snapshot_frame(
    gid: str, members: list[dict[str, str]], count: int, limit: int
) -> bytes:
    """PRESENCE_SNAPSHOT (PROTOCOL.md, "Presence"): at most ``limit`` of the
    guild's ``count`` members; ``truncated`` says whether some are left out."""
    listed = members[: max(0, limit)]
    d = {"members": listed, "count": count, "truncated": len(listed) < count}
    return message(Op.DISPATCH, d, t="PRESENCE_SNAPSHOT", g=gid)


def unsubscribed_frame(gid: str) -> bytes:
    """The answer to UNSUBSCRIBE (PROTOCOL.md, "Subscribing and recovery")."""
    return message(Op.DISPATCH, None, t="UNSUBSCRIBED", g=gid)


HEARTBEAT_ACK_FRAME = message(Op.HEARTBEAT_ACK)
RECONNECT_FRAME = message(Op.RECONNECT)
