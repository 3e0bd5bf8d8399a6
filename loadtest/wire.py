"""The harness's wire: the load-test event format and the opening handshake.

Owns what is particular to the load generator: the event it publishes, the
byte offsets at which a subscriber reads an event's guild, ``s`` and publish
time without a JSON parse, and the client side of the WebSocket upgrade. The
protocol itself is the protocol package's: frames are built and split by
:mod:`guildcast.protocol.frames`, messages come from
:mod:`guildcast.protocol.client`'s builders, tokens from
:mod:`guildcast.core.tokens`, and the upgrade is websockets' Sans-I/O
``ClientProtocol``. No asyncio here.

Event format: every published event is ``t = "LT"`` with
``d = {"ts": <time.time_ns() // 1000 at publish: microseconds>, "pad": "x" * k}``.
The server puts ``d``'s JSON into the envelope verbatim
(:func:`guildcast.protocol.wire.dispatch_json`, the one envelope builder), so
a guild DISPATCH is ``{"op":0,"t":"LT","g":GID,"s":S,"d":{"ts":TS,...``: the
offsets below are measured on that builder's own output at import, never
counted by hand, and ``g``, ``s`` and ``ts`` are found with two
``bytes.find`` calls. Anything that does not match the prefix takes the slow
path (a full JSON parse), so a server that orders keys differently is still
measured correctly, only more slowly.

Runs (:func:`regular_run`): a read chunk usually holds a server batch, several
such DISPATCHes of one guild back to back, of one length (only the digits of
``s`` and ``ts`` differ). Such a run is recognised and its fields read with a
handful of C-level calls for the whole chunk instead of Python work per frame;
every frame's header, guild and layout is still checked, exactly, and
anything else is left to the per-frame path.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Collection

import orjson
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from guildcast.core.tokens import make_token
from guildcast.protocol import client as pc
from guildcast.protocol import wire as pw
from guildcast.protocol.codes import SUBPROTOCOL, Op
from guildcast.protocol.frames import OP_CLOSE, OP_TEXT, client_frame, close_payload

#: Event name of every load-test event (PROTOCOL.md: ``[A-Z0-9_]{1,64}``).
EVENT = "LT"
#: The publish time in microseconds has 16 digits from 2001 to 2286.
TS_DIGITS = 16
#: Seconds a harness token is valid: longer than any run.
TOKEN_TTL = 24 * 3600
#: Longest HTTP response head accepted during the upgrade.
MAX_RESPONSE_HEAD = 16384

HEARTBEAT = pc.HEARTBEAT


def event_data(ts: int, pad: bytes) -> bytes:
    """The JSON of one event's ``d``; ``ts`` in microseconds since the epoch."""
    return b'{"ts":' + str(ts).encode() + b',"pad":"' + pad + b'"}'


#: Bytes of ``d`` that are not padding: ``{"ts":1234567890123456,"pad":""}``.
D_OVERHEAD = len(event_data(10 ** (TS_DIGITS - 1), b""))


def _layout() -> tuple[bytes, int, int]:
    """The fast path's prefix and offsets, measured on the server's envelope."""
    gid, s, ts = "G", 7, 10 ** (TS_DIGITS - 1)
    sample = pw.dispatch_json(gid, EVENT, s, event_data(ts, b""))
    q = sample.index(b'"' + gid.encode() + b'"') + 1 + len(gid)  # the guild's closing quote
    s_at = sample.index(str(s).encode(), q)
    ts_at = sample.index(str(ts).encode(), s_at)
    prefix = sample[: q - len(gid)]
    if sample[s_at + 1 : s_at + 2] != b",":
        raise RuntimeError(f"unexpected DISPATCH layout: {sample!r}")
    return prefix, s_at - q, ts_at - (s_at + 1)


#: The bytes a fast-path DISPATCH starts with, up to the guild id;
#: from the guild id's closing quote to the first digit of ``s``; from the
#: comma after ``s`` to the first digit of ``ts``.
DISPATCH_PREFIX, GID_TO_S, S_TO_TS = _layout()


def _run_literals() -> tuple[bytes, bytes]:
    """The bytes from a guild id's closing quote to ``s`` (``","s":``) and
    from the end of ``s`` to ``ts`` (``,"d":{"ts":``), measured on the
    server's envelope as the offsets above are."""
    gid, s = "G", 7
    sample = pw.dispatch_json(gid, EVENT, s, event_data(10 ** (TS_DIGITS - 1), b""))
    q = len(DISPATCH_PREFIX) + len(gid)
    s_end = q + GID_TO_S + len(str(s))
    return sample[q : q + GID_TO_S], sample[s_end : s_end + S_TO_TS]


_GID_CLOSE, _S_TO_TS = _run_literals()
#: Fewest frames a run is read for: one (a read of one frame is also read
#: in bulk, and remembered: the same frame reaches every member of its guild).
RUN_MIN = 1
#: Run patterns kept (one per frame header, guild id length and number of
#: digits of ``s`` met): a handful in a run; all dropped when full.
RUN_PATTERNS = 256
_runs: dict[tuple[bytes, int, int], re.Pattern[bytes] | None] = {}


def _run_pattern(head: bytes, frame: int, lg: int, ls: int) -> re.Pattern[bytes] | None:
    """The pattern of one whole frame of ``frame`` bytes starting with
    ``head``: a DISPATCH whose guild id has ``lg`` bytes and ``s`` ``ls``
    digits (groups: guild id, ``s``, ``ts``); the rest of the frame (the
    rest of ``d``) is skipped, not scanned: ``.{k}`` costs the same for any k."""
    key = (head, lg, ls)
    if key in _runs:
        return _runs[key]
    fixed = len(head) + len(DISPATCH_PREFIX) + lg + len(_GID_CLOSE) + ls + len(_S_TO_TS)
    rest = frame - fixed - TS_DIGITS
    pat = None
    if rest >= 0:
        pat = re.compile(
            re.escape(head + DISPATCH_PREFIX)
            + rb'([^"\\]{%d})' % lg
            + re.escape(_GID_CLOSE)
            + rb"(\d{%d})" % ls
            + re.escape(_S_TO_TS)
            + rb"(\d{%d}).{%d}" % (TS_DIGITS, rest),
            re.DOTALL,
        )
    if len(_runs) >= RUN_PATTERNS:
        _runs.clear()
    _runs[key] = pat
    return pat


def regular_run(data: bytes) -> tuple[int, list[tuple[bytes, bytes, bytes]]] | None:
    """The run of load-test DISPATCH frames of one length at the start of
    ``data``, read in bulk: ``(end, [(gid, s, ts), ...])`` with ``s`` and
    ``ts`` as digits, or None when ``data`` does not start with at least
    :data:`RUN_MIN` complete frames of one length that are all such
    DISPATCHes (the caller then walks the frames one by one).

    Exact, not a guess: every frame of the run is matched whole by one
    pattern that holds the first frame's header (so the same length: the
    frames tile ``data[:end]``, as a frame walk finds them), the DISPATCH
    prefix, a guild id of the first one's length up to its closing quote,
    ``s`` of the first one's number of digits and ``ts`` where the layout
    puts them (what the per-frame fast path reads); ``len(found)`` runs of
    ``frame`` bytes in ``frame * len(found)`` bytes tile them. What follows
    ``end`` (a partial frame, another frame) is the caller's.
    """
    n = len(data)
    if n < 4 or data[0] != 0x81:
        return None
    ln = data[1]
    if ln < 126:
        p = 2
    elif ln == 126:
        ln = data[2] << 8 | data[3]
        p = 4
    else:
        return None
    f = p + ln
    k = n // f
    if k < RUN_MIN or not data.startswith(DISPATCH_PREFIX, p):
        return None
    a = p + len(DISPATCH_PREFIX)
    q = data.find(b'"', a, f)
    if q < 0:
        return None
    st = q + len(_GID_CLOSE)
    se = data.find(b",", st, f)
    if se < 0:
        return None
    pat = _run_pattern(data[:p], f, q - a, se - st)
    if pat is None:
        return None
    found = pat.findall(data, 0, k * f)
    j = len(found)
    if j != k:
        # Fewer: the run ends early (another frame follows); its matches
        # tile data[: j * f] only if all j of them are found there; else
        # the first frame alone, if it is one.
        if j > 1:
            found = pat.findall(data, 0, j * f)
            if len(found) == j:
                return j * f, found
        m = pat.match(data, 0, f)
        if m is None:
            return None
        g, s, ts = m.groups()
        return f, [(g, s, ts)]
    return k * f, found


#: A run as a subscriber checks it: ``(end, gid, gids, s values, ts values)``;
#: ``gid`` is the guild of every frame when they all have one and their ``s``
#: follow one another, else None (the caller then checks frame by frame).
Run = tuple[int, bytes | None, tuple[bytes, ...], list[int], list[int]]
#: Chunks a :class:`RunReader` remembers, and the longest it remembers: the
#: memory bound is their product (8 MiB); when full, all are forgotten.
RUN_CACHE = 512
RUN_CACHE_BYTES = 16384


#: What :meth:`RunReader.read` finds for a chunk it has not seen (by identity).
_MISS: Run = (-1, None, (), [], [])


class RunReader:
    """:func:`regular_run` with a memory of the chunks it read.

    Every subscriber of a guild is sent the same frames, and a server batch
    usually arrives as one read, so the same chunk comes in on many
    connections: it is parsed once, and a later identical chunk (the whole
    read, compared byte for byte as a dict key) gets the same answer. Bound:
    :data:`RUN_CACHE` chunks of at most :data:`RUN_CACHE_BYTES`, all
    dropped when full (the ones in use come back at once); a longer chunk is
    read, not remembered.
    """

    __slots__ = ("_seen", "hits", "misses")

    def __init__(self) -> None:
        self._seen: dict[bytes, Run | None] = {}
        #: Chunks answered from memory, and parsed.
        self.hits = 0
        self.misses = 0

    def read(self, data: bytes) -> Run | None:
        seen = self._seen
        run = seen.get(data, _MISS)
        if run is not _MISS:
            self.hits += 1
            return run
        self.misses += 1
        found = regular_run(data)
        if found is None:
            run = None
        else:
            end, fields = found
            if len(fields) == 1:
                g, s, ts = fields[0]
                run = (end, g, (g,), [int(s)], [int(ts)])
            else:
                gids, ss, tss = zip(*fields, strict=True)
                ints = list(map(int, ss))
                gid: bytes | None = gids[0]
                k = len(ints)
                if gids.count(gid) != k or ints != list(range(ints[0], ints[0] + k)):
                    gid = None
                run = (end, gid, gids, ints, list(map(int, tss)))
        if len(data) <= RUN_CACHE_BYTES:
            if len(seen) >= RUN_CACHE:
                seen.clear()
            seen[data] = run
        return run


#: The bytes an ACK starts with (:func:`fast_ack_s`).
_ACK_PREFIX = b'{"op":%d,' % Op.ACK


#: Words of a ``text`` pad: a vocabulary like chat's, drawn at random with a
#: fixed seed, so the pad compresses about as chat messages do (a 200-byte
#: event to about 0.7 of its size) rather than to nothing, as "x" * k does.
_WORDS = (
    b"the a to of and in is it you that was for on are with as be at one have this "
    b"from or had by but what some we can out other were all there when up use your "
    b"how said an each she which do their time if will way about many then them would "
    b"like so these her long make thing see him two has look more day could go come "
    b"deploy cache build graph ticket review merge green red ok thanks later today"
).split()


def pad_for(size: int, kind: str = "x") -> bytes:
    """The ``pad`` string that makes ``d`` about ``size`` bytes of JSON:
    ``kind`` "x" repeats one letter, "text" is words (``--pad``)."""
    n = max(0, size - D_OVERHEAD)
    if kind == "x":
        return b"x" * n
    rng = random.Random(n)
    out = bytearray()
    while len(out) < n:
        out += rng.choice(_WORDS) + b" "
    return bytes(out[:n])


def publish_payload(gid: bytes | str, ts: int, pad: bytes, nonce: str | None = None) -> bytes:
    """A PUBLISH of one load-test event (``ts`` in us), by the protocol's builder."""
    g = gid.decode() if isinstance(gid, bytes) else gid
    return pc.publish_message(g, EVENT, orjson.Fragment(event_data(ts, pad)), nonce)


def mint(secret: str, sub: str, guilds: list[str], pub: list[str], pub_rate: float | None) -> str:
    """An HS256 token (PROTOCOL.md "Tokens") valid for :data:`TOKEN_TTL` seconds."""
    return make_token(secret, sub, guilds, pub, pub_rate, ttl=TOKEN_TTL)


def text(payload: bytes) -> bytes:
    """One masked client text frame."""
    return client_frame(OP_TEXT, payload)


def close_frame(code: int, reason: str = "") -> bytes:
    """A masked client close frame."""
    return client_frame(OP_CLOSE, close_payload(code, reason))


def identify(
    token: str,
    guilds: dict[str, pc.Position | None],
    passive: Collection[str] = (),
    activity_batch: bool = False,
) -> bytes:
    """A framed IDENTIFY (the guilds in ``passive`` subscribed passively;
    ``activity_batch``: their notices of a tick in one message)."""
    return text(pc.identify_message(token, guilds, passive=passive, activity_batch=activity_batch))


def subscribe(guilds: dict[str, pc.Position | None], passive: Collection[str] = ()) -> bytes:
    """A framed SUBSCRIBE (the guilds in ``passive`` subscribed passively)."""
    return text(pc.subscribe_message(guilds, passive))


def unsubscribe(guilds: list[str]) -> bytes:
    """A framed UNSUBSCRIBE."""
    return text(pc.unsubscribe_message(guilds))


class Upgrade:
    """The client's side of the opening handshake (RFC 6455 section 4.1),
    by websockets' Sans-I/O ``ClientProtocol``: :attr:`request` goes out,
    then :meth:`receive` takes the response as it arrives."""

    __slots__ = ("_head", "_proto", "request")

    def __init__(self, host: str, port: int, path: str, deflate: bool = False) -> None:
        netloc = f"[{host}]" if ":" in host else host
        # Offers guildcast.v1 as our clients do (protocol 1.1: a RECONNECT
        # then names its reconnect delay range), and with ``deflate`` the
        # permessage-deflate offer a browser makes (websockets checks the
        # answer); frames are inflated by :class:`Inflater`.
        exts = [ClientPerMessageDeflateFactory(client_max_window_bits=True)] if deflate else None
        self._proto = ClientProtocol(
            parse_uri(f"ws://{netloc}:{port}{path}"),
            subprotocols=[Subprotocol(SUBPROTOCOL)],
            extensions=exts,
        )
        request = self._proto.connect()
        request.headers["User-Agent"] = "guildcast-loadtest"
        self._proto.send_request(request)
        self.request = b"".join(self._proto.data_to_send())
        self._head = b""

    def receive(self, data: bytes) -> tuple[bool, str | None, bytes]:
        """``(done, error, rest)``: done once the response head is complete;
        ``error`` says why the upgrade failed; ``rest`` is what followed the
        head (the first frames)."""
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_RESPONSE_HEAD:
                return True, "handshake response too long", b""
            self._head = head
            return False, None, b""
        self._head = b""
        # Only the head: the frames after it are the harness's to parse.
        self._proto.receive_data(head[: end + 4])
        self._proto.events_received()
        exc = self._proto.handshake_exc
        if exc is not None:
            return True, f"upgrade refused: {exc}"[:120], b""
        if self._proto.state is not State.OPEN:
            # Not 101: the parser waits for a body it will never be given.
            status = head[: head.find(b"\r\n")].decode("latin-1")
            return True, f"upgrade refused: {status}"[:120], b""
        return True, None, head[end + 4 :]


class Inflater:
    """Inflates permessage-deflate messages of servers that answer
    ``server_no_context_takeover`` (Guildcast always does): no message refers
    to an earlier one, so one inflater serves every connection of a worker,
    message after message, instead of 32 KiB of window per connection."""

    __slots__ = ("_z", "bytes_in", "bytes_out")

    def __init__(self) -> None:
        self._z = zlib.decompressobj(-15)
        #: Compressed payload bytes received, and what they inflated to.
        self.bytes_in = 0
        self.bytes_out = 0

    def inflate(self, payload: bytes) -> bytes:
        out = self._z.decompress(payload + b"\x00\x00\xff\xff")
        self.bytes_in += len(payload)
        self.bytes_out += len(out)
        return out


def fast_ack_s(payload: bytes) -> int | None:
    """``s`` of an ACK ``{"op":12,"d":{"g":..,"s":N,...}}`` without a JSON parse."""
    if not payload.startswith(_ACK_PREFIX):
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
