"""permessage-deflate (RFC 7692) for server frames: compressed once, shared.

The gateway answers every permessage-deflate offer it accepts with
``server_no_context_takeover`` (docs/PROTOCOL.md "Compression"), so a
compressed message never refers to anything sent before it on its
connection: the same bytes are a valid message on every connection that
negotiated the extension, as an uncompressed frame is (frames.py). A
:class:`Deflater` (one per node and parameter set) compresses each message
once, and every session that negotiated the extension is written the same
frame, RSV1 set. There is no compressor per connection.

One long-lived zlib compressor (raw deflate, ``MAX_WINDOW_BITS``) is flushed
with ``Z_FULL_FLUSH`` after each message: a full flush resets the
compressor's dictionary, so no back-reference crosses it, and ends the
output on a byte boundary with the empty stored block ``00 00 ff ff``, which
RFC 7692 section 7.2.1 strips from the message. Each message's output thus
inflates alone with a fresh inflater, exactly as a per-message compressor's
would, without a 256 KiB compressor state allocated per message.

Messages whose payload is below ``threshold`` bytes go uncompressed (RFC
7692 section 6 decides per message; RSV1 clear): under about 128 bytes a JSON
message shrinks by less than 10% (docs/BENCHMARKS.md "Compression").

Consistency model: single-threaded (one event loop per node; the workers of
``--workers N`` are processes with their own); counters only grow.
"""

from __future__ import annotations

import zlib

from guildcast.protocol.frames import OP_TEXT, text_frame

__all__ = [
    "COMPRESS_LEVEL",
    "DEFAULT_THRESHOLD",
    "MAX_WINDOW_BITS",
    "RSV1",
    "Deflater",
    "SharedFrame",
    "payload_of",
]

#: RSV1 of a frame's first byte: "this message is compressed" (RFC 7692 section 6).
RSV1 = 0x40
#: The LZ77 window the server compresses with: 32 KiB, the largest, which
#: every permessage-deflate client supports; a client asking for a smaller
#: ``server_max_window_bits`` is served uncompressed (transport/compression.py).
MAX_WINDOW_BITS = 15
#: zlib's level: 6 (zlib's default) is 15% smaller than 1 on a 4 KiB JSON
#: snapshot for about twice the time; a message is compressed once per node,
#: not once per recipient, so the bytes win (docs/BENCHMARKS.md "Compression").
COMPRESS_LEVEL = 6
#: Payloads below this many bytes are not compressed (measured: below 128
#: bytes JSON shrinks by under 10%, often not at all).
DEFAULT_THRESHOLD = 128
#: The empty stored block a sync or full flush ends with (section 7.2.1).
_TAIL = b"\x00\x00\xff\xff"


def payload_of(frame: bytes) -> bytes:
    """The payload of one unmasked frame built by :func:`~frames.text_frame`."""
    n = frame[1]
    if n < 126:
        return frame[2:]
    return frame[4:] if n == 126 else frame[10:]


def _rsv1_text_frame(data: bytes) -> bytes:
    n = len(data)
    if n < 126:
        return bytes((0xC1, n)) + data
    if n < 65536:
        return bytes((0xC1, 126)) + n.to_bytes(2, "big") + data
    return bytes((0xC1, 127)) + n.to_bytes(8, "big") + data


class Deflater:
    """Compresses server messages for every session of one parameter set."""

    __slots__ = ("_z", "bytes_in", "bytes_out", "compressed", "threshold")

    def __init__(self, threshold: int = DEFAULT_THRESHOLD, level: int = COMPRESS_LEVEL) -> None:
        self.threshold = threshold
        self._z = zlib.compressobj(level, zlib.DEFLATED, -MAX_WINDOW_BITS)
        #: Messages compressed, and their payload bytes before and after.
        self.compressed = 0
        self.bytes_in = 0
        self.bytes_out = 0

    def compress(self, payload: bytes) -> bytes:
        """``payload`` as one permessage-deflate message body (tail stripped)."""
        z = self._z
        out = z.compress(payload) + z.flush(zlib.Z_FULL_FLUSH)
        assert out.endswith(_TAIL)
        body = out[:-4]
        self.compressed += 1
        self.bytes_in += len(payload)
        self.bytes_out += len(body)
        return body

    def text(self, payload: bytes) -> bytes:
        """One final text frame for ``payload``: compressed (RSV1) unless
        small, or unless compressing does not make it smaller."""
        if len(payload) < self.threshold:
            return text_frame(payload)
        body = self.compress(payload)
        return text_frame(payload) if len(body) >= len(payload) else _rsv1_text_frame(body)

    def frame(self, frame: bytes) -> bytes:
        """:meth:`text` of a frame :func:`~frames.text_frame` built (a shared event frame)."""
        if len(frame) - 2 < self.threshold:
            return frame
        payload = payload_of(frame)
        body = self.compress(payload)
        return frame if len(body) >= len(payload) else _rsv1_text_frame(body)

    def frames(self, data: bytes) -> bytes:
        """``data``, a run of whole unmasked server frames, with each final
        text frame at or above the threshold compressed; others as they are.

        For the frames a session gets that are not shared events (its
        SUBSCRIBED and replay, UNSUBSCRIBED, a presence dispatch, its own
        answers): they follow the same rule, compressed by the same
        compressor. A run shorter than the threshold holds no frame to compress
        and is returned as it is, without a scan.
        """
        if len(data) - 2 < self.threshold:
            return data
        out: list[bytes] = []
        i, n = 0, len(data)
        changed = False
        while i < n:
            b0, ln = data[i], data[i + 1]
            p = i + 2
            if ln == 126:
                ln = int.from_bytes(data[i + 2 : i + 4], "big")
                p = i + 4
            elif ln == 127:
                ln = int.from_bytes(data[i + 2 : i + 10], "big")
                p = i + 10
            end = p + ln
            if b0 == (0x80 | OP_TEXT) and ln >= self.threshold:
                payload = data[p:end]
                body = self.compress(payload)
                if len(body) < ln:
                    out.append(_rsv1_text_frame(body))
                    changed = True
                else:
                    out.append(data[i:end])
            else:
                out.append(data[i:end])
            i = end
        return b"".join(out) if changed else data


class SharedFrame:
    """One whole server frame sent to many sessions (a presence snapshot, a
    replayed event, a passive notice), compressed at most once per
    :class:`Deflater`, by the first session of that parameter set to need it.

    Bound: one entry per parameter set (one per node in practice); the
    frame's owner drops it with the frame.
    """

    __slots__ = ("_z", "frame")

    def __init__(self, frame: bytes) -> None:
        self.frame = frame
        self._z: dict[Deflater, bytes] | None = None

    def compressed(self, deflater: Deflater) -> bytes:
        """The frame as ``deflater``'s sessions get it: :meth:`Deflater.frames`
        (the frame may be a run of frames), once."""
        z = self._z
        if z is None:
            z = self._z = {}
        hit = z.get(deflater)
        if hit is None:
            hit = z[deflater] = deflater.frames(self.frame)
        return hit

    def for_sink(self, deflater: Deflater | None) -> bytes:
        """What a session with ``deflater`` (None: uncompressed) is sent."""
        return self.frame if deflater is None else self.compressed(deflater)
