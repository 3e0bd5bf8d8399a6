"""The small interface the transport gives the actors for one connection.

A partition actor only ever calls :meth:`Sink.send` (one write of already
framed bytes) and :meth:`Sink.close`; it never awaits a client (docs/DESIGN.md,
hot-path rule 3). The unsent-bytes bound is enforced inside ``send``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from guildcast.protocol.deflate import Deflater


class Sink(Protocol):
    """One client connection, as seen by the fanout path."""

    #: Event names the session wants, or None for all (IDENTIFY ``events``).
    events: frozenset[str] | None
    #: The node's compressor for this session's permessage-deflate parameter
    #: set, or None: the session gets uncompressed frames. Fixed at the
    #: handshake; the writers send such a session the frames compressed once
    #: for all of them (docs/PROTOCOL.md "Compression").
    deflate: Deflater | None

    def send(self, data: bytes) -> None:
        """Queue ``data`` for the socket without waiting.

        If the connection's unsent bytes pass its bound, the connection is
        closed with 4010 (slow consumer) instead. Sending to a closed
        connection does nothing.
        """

    def close(self, code: int, reason: str) -> None:
        """Start the WebSocket close handshake with ``code``; idempotent."""

    @property
    def activity_batch(self) -> bool:
        """(1.1) IDENTIFY ``activity_batch``: the session takes a passive
        tick's notices as one GUILD_ACTIVITY of several guilds (actors/passive.py)."""

    @property
    def is_closed(self) -> bool:
        """True once the connection has started closing."""


class Member(Protocol):
    """Anything that can join a process group: it must report its own exit."""

    def add_exit_hook(self, hook: Callable[[object], None]) -> None:
        """Call ``hook(self)`` once when this member exits (at most once)."""
