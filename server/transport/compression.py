"""Negotiating permessage-deflate (RFC 7692) so that every connection can share frames.

The gateway never lets websockets compress what it sends: event frames are
compressed once per node by :class:`~guildcast.protocol.deflate.Deflater`
and written as they are to every session that negotiated the extension
(docs/PROTOCOL.md "Compression"). That is only valid when every such session
decodes each message on its own with a 32 KiB window, so the answer is
always ``server_no_context_takeover`` (RFC 7692 section 7.1.1.1 lets a server
say so whatever the offer) with no smaller ``server_max_window_bits``. We
also ask the client for ``client_no_context_takeover`` and a
``client_max_window_bits`` of ``CLIENT_MAX_WINDOW_BITS`` where it offers that
parameter, so websockets' per-connection extension object holds no inflater
between messages (an idle connection costs no zlib state either way).

An offer we cannot share (``server_max_window_bits`` below 15, or a
malformed one) is declined, not refused: the connection opens without the
extension and is served uncompressed frames.

websockets' own :class:`PerMessageDeflate` still decodes what the client
sends (compressed or not); it would only compress frames we asked it to
send, and the gateway asks it for control frames only (close, pong), which
RFC 7692 never compresses.

Consistency model: the factory is stateless and shared by every
connection; it runs once per handshake.
"""

from __future__ import annotations

from collections.abc import Sequence

from websockets.exceptions import NegotiationError
from websockets.extensions.base import Extension
from websockets.extensions.permessage_deflate import (
    PerMessageDeflate,
    ServerPerMessageDeflateFactory,
)
from websockets.typing import ExtensionParameter

from guildcast.protocol.deflate import MAX_WINDOW_BITS

#: The window we ask clients to compress with (4 KiB): their messages are
#: PUBLISHes of a few hundred bytes to a few KiB, so a small window loses
#: little, and the inflater websockets makes for each compressed client
#: message then allocates 4 KiB of window instead of 32 KiB.
CLIENT_MAX_WINDOW_BITS = 12


class SharedDeflateFactory(ServerPerMessageDeflateFactory):
    """permessage-deflate with the parameters one shared compressed frame needs."""

    def __init__(self) -> None:
        super().__init__(
            server_no_context_takeover=True,
            client_no_context_takeover=True,
            client_max_window_bits=CLIENT_MAX_WINDOW_BITS,
        )

    def process_request_params(
        self,
        params: Sequence[ExtensionParameter],
        accepted_extensions: Sequence[Extension],
    ) -> tuple[list[ExtensionParameter], PerMessageDeflate]:
        response, ext = super().process_request_params(params, accepted_extensions)
        if ext.local_max_window_bits != MAX_WINDOW_BITS:
            # websockets moves on to the client's next offer, or to none.
            raise NegotiationError(
                f"server_max_window_bits={ext.local_max_window_bits}: "
                "this server shares frames compressed with a 32 KiB window"
            )
        assert ext.local_no_context_takeover
        return response, ext


def negotiated(extensions: Sequence[Extension]) -> bool:
    """Whether the handshake's accepted extensions include permessage-deflate."""
    return any(isinstance(e, PerMessageDeflate) for e in extensions)
