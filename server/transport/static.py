"""The demo page, served from the gateway's own port.

Owns the few static files a newcomer needs to see Guildcast work with nothing
else installed: the live board page and the browser client ``guildcast.js``.
``static/guildcast.js`` is the one real file of that client (so the wheel
ships it as package data and the server does not depend on ``clients``);
``clients/js/guildcast.js`` is a relative symlink to it, not a copy. The files
are read once at import from the package data directory ``static/`` and never
change afterwards, so serving is a dictionary lookup.

A plain HTTP GET (no ``Upgrade`` header) for a path in :data:`PAGES` is
answered 200 with the file by :meth:`guildcast.transport.gateway.Connection._on_request`;
websockets then closes the connection (one request per connection, no
keep-alive). Every other request goes on to the WebSocket handshake.
"""

from __future__ import annotations

import email.utils
from importlib import resources

from websockets.datastructures import Headers
from websockets.http11 import Response

_STATIC = resources.files("guildcast.transport").joinpath("static")

#: Request path -> (file in ``static/``, Content-Type).
PAGES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/demo": ("index.html", "text/html; charset=utf-8"),
    "/guildcast.js": ("guildcast.js", "text/javascript; charset=utf-8"),
}

_BODIES: dict[str, tuple[bytes, str]] = {
    path: (_STATIC.joinpath(name).read_bytes(), ctype) for path, (name, ctype) in PAGES.items()
}


def response_for(path: str) -> Response | None:
    """The 200 response for a static ``path`` (query string removed), or None."""
    entry = _BODIES.get(path)
    if entry is None:
        return None
    body, ctype = entry
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Content-Type", ctype),
            ("Content-Length", str(len(body))),
            # The files change only with the server version; revalidate anyway
            # so an upgraded server is never paired with a stale client.
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
            ("Connection", "close"),
        ]
    )
    if ctype.startswith("text/javascript"):
        # Module scripts load in CORS mode: let any page import the client.
        headers["Access-Control-Allow-Origin"] = "*"
    return Response(200, "OK", headers, body)
