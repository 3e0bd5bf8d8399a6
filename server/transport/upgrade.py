"""The opening handshake's fast path: a plain WebSocket upgrade request to
the gateway, checked and answered without websockets' request parser.

websockets parses the request one line at a time through a generator,
builds a ``Headers`` multidict and a ``Response``, and formats the
``Date`` header with ``email.utils.formatdate``: py-spy put that at a third
of the server's CPU while 19,900 clients connected (docs/BENCHMARKS.md,
issue 14). :func:`parse` looks at the first read of a connection and
returns a :class:`Handshake` only for a request it can check completely:
the whole head in that read, ``GET`` over HTTP/1.1 to a gateway path, no
body, and every check websockets' ``ServerProtocol.accept`` makes
(``Connection: upgrade``, ``Upgrade: websocket``, a 16-byte base64
``Sec-WebSocket-Key``, ``Sec-WebSocket-Version: 13``, at most one
``Origin``, a well-formed ``Sec-WebSocket-Protocol`` list, and each header
line's grammar and length limits as websockets checks them). For anything
else it returns None and the gateway hands the bytes to websockets as
before, so every request it does not accept here gets websockets' answer,
byte for byte. A request offering extensions (``Sec-WebSocket-Extensions``)
always goes to websockets, which negotiates them.

:func:`response` is the 101 websockets would send (the same headers in the
same order), with the ``Date`` formatted once per second (:class:`_Date`).
Pure functions and one cached string; no queue.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import re
import time
from collections.abc import Collection
from dataclasses import dataclass

from websockets.http11 import MAX_LINE_LENGTH, MAX_NUM_HEADERS

#: RFC 6455 section 1.3: appended to the key before hashing.
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Header names and list elements (RFC 7230 ``token``), and header values,
#: exactly as websockets' parser (websockets/http11.py) accepts them.
_TOKEN_CHARS = rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]"
_VALUE_CHARS = rb"[\x09\x20-\x7e\x80-\xff]"
_TOKEN = re.compile(_TOKEN_CHARS + rb"+")
#: A whole request head (without its final CRLF CRLF) websockets' parser
#: reads line by line: ``GET``, a target without spaces, ``HTTP/1.1``,
#: then header lines ``token ":" value``. A value's characters include
#: space and tab, so a value with surrounding whitespace matches exactly
#: when the stripped value does; none is CR or LF, so no line holds a lone
#: one. Groups: the target, the header lines (each after its CRLF).
_HEAD = re.compile(
    rb"GET ([^ \r\n]*) HTTP/1\.1((?:\r\n" + _TOKEN_CHARS + rb"+:" + _VALUE_CHARS + rb"*)*)"
)
#: One checked header line: name, raw value (``_HEAD`` has checked both).
_FIELD = re.compile(rb"\r\n([^:]*):([^\r]*)")
#: Headers with a check of their own below; any other is only validated.
_CONNECTION = b"connection"
_UPGRADE = b"upgrade"
_KEY = b"sec-websocket-key"
_VERSION = b"sec-websocket-version"
_ORIGIN = b"origin"
_PROTOCOL = b"sec-websocket-protocol"
#: Present at all: websockets takes the request (extensions are negotiated
#: there; a body or a transfer coding is refused there).
_TO_WEBSOCKETS = b"to websockets"
#: Lower-cased header name -> its check (the names above).
_SPECIAL: dict[bytes, bytes] = {
    _CONNECTION: _CONNECTION,
    _UPGRADE: _UPGRADE,
    _KEY: _KEY,
    _VERSION: _VERSION,
    _ORIGIN: _ORIGIN,
    _PROTOCOL: _PROTOCOL,
    b"sec-websocket-extensions": _TO_WEBSOCKETS,
    b"transfer-encoding": _TO_WEBSOCKETS,
    b"content-length": _TO_WEBSOCKETS,
}


@dataclass(frozen=True, slots=True)
class Handshake:
    """A checked upgrade request."""

    #: The request target as sent (path and query).
    path: str
    #: The ``Sec-WebSocket-Accept`` value.
    accept: str
    #: The subprotocols offered, in the client's order (may be empty).
    offered: tuple[str, ...]
    #: Bytes after the request head (frames a client sent at once).
    rest: bytes


def parse(data: bytes, paths: Collection[str]) -> Handshake | None:
    """The handshake in ``data`` (a connection's first read), or None if it
    is not a complete, plain upgrade request to one of ``paths`` that this
    module can check; websockets then parses the same bytes.

    One regular expression checks the whole head's grammar (``_HEAD``: the
    request line and every header line, names and values as websockets'
    parser accepts them, no lone CR or LF); a second splits the checked
    header lines into names and values (``_FIELD``); only the headers with a
    check of their own are looked at one by one."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None  # more than one read: websockets buffers
    head = _HEAD.fullmatch(data, 0, end)
    if head is None:
        return None
    fields = head[2]
    if fields.count(b"\r\n") > MAX_NUM_HEADERS:
        return None
    # websockets reads a line of at most MAX_LINE_LENGTH bytes with its CRLF.
    if end + 2 > MAX_LINE_LENGTH and any(
        len(line) + 2 > MAX_LINE_LENGTH for line in data[:end].split(b"\r\n")
    ):
        return None
    raw_path = head[1]
    if not raw_path.isascii():
        return None
    path = raw_path.decode("ascii")
    if path.split("?", 1)[0] not in paths:
        return None
    connection = upgrade = key = version = None
    origins = 0
    offered: list[str] = []
    special = _SPECIAL.get
    for raw_name, raw_value in _FIELD.findall(fields):
        kind = special(raw_name.lower())
        if kind is None:
            continue
        if kind is _TO_WEBSOCKETS:
            return None
        value = raw_value.strip(b" \t")
        if kind is _CONNECTION:
            if connection is not None:
                return None
            connection = value
        elif kind is _UPGRADE:
            if upgrade is not None:
                return None
            upgrade = value
        elif kind is _KEY:
            if key is not None:
                return None
            key = value
        elif kind is _VERSION:
            if version is not None:
                return None
            version = value
        elif kind is _ORIGIN:
            origins += 1
        else:  # _PROTOCOL
            for item in value.split(b","):
                item = item.strip(b" \t")
                if _TOKEN.fullmatch(item) is None:
                    return None
                offered.append(item.decode("ascii"))
    if origins > 1 or version != b"13" or upgrade is None or upgrade.lower() != b"websocket":
        return None
    if connection is None or not _has_upgrade(connection):
        return None
    if key is None or not _valid_key(key):
        return None
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode("ascii")
    return Handshake(path, accept, tuple(offered), data[end + 4 :])


def _has_upgrade(value: bytes) -> bool:
    """``Connection`` is a list of tokens including ``upgrade`` (any case)."""
    found = False
    for item in value.split(b","):
        item = item.strip(b" \t")
        if _TOKEN.fullmatch(item) is None:
            return False  # websockets' own list parser decides
        if item.lower() == b"upgrade":
            found = True
    return found


def _valid_key(key: bytes) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


class _Date:
    """The ``Date`` header of this second (RFC 9110 IMF-fixdate, as
    ``email.utils.formatdate(usegmt=True)`` writes it), formatted once."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._value = email.utils.formatdate(second, usegmt=True)
            self._second = second
        return self._value


_date = _Date()


def response(accept: str, subprotocol: str | None) -> bytes:
    """The 101 Switching Protocols answer, as websockets' ``accept`` builds it."""
    proto = f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol is not None else ""
    return (
        f"HTTP/1.1 101 Switching Protocols\r\nDate: {_date.now()}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept}\r\n{proto}\r\n"
    ).encode("ascii")
