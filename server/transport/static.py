"""The demo page and the health checks, served from the gateway's own port.

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

The gateway port also answers, for load balancers in front of it (and for a
node run with ``--api-port -1``), ``GET /healthz`` (200 while the process
serves) and ``GET /readyz`` (200, or 503 with the reason while draining or
waiting for Redis), with the HTTP API's bodies; and ``/favicon.ico`` with
204 (no icon, no error in a browser's console). ``--no-demo`` turns the
board (``/``, ``/demo``) into 404s; ``/guildcast.js`` stays, applications
import it.
"""

from __future__ import annotations

import email.utils
from collections.abc import Callable
from importlib import resources

import orjson
from websockets.datastructures import Headers
from websockets.http11 import Response

_STATIC = resources.files("guildcast.transport").joinpath("static")

#: Request path -> (file in ``static/``, Content-Type).
PAGES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/demo": ("index.html", "text/html; charset=utf-8"),
    "/guildcast.js": ("guildcast.js", "text/javascript; charset=utf-8"),
}

#: The paths of the demo board itself (``demo=False`` leaves them out).
DEMO_PATHS = frozenset({"/", "/demo"})

_BODIES: dict[str, tuple[bytes, str]] = {
    path: (_STATIC.joinpath(name).read_bytes(), ctype) for path, (name, ctype) in PAGES.items()
}

_JSON = "application/json"


def response_for(
    path: str, demo: bool = True, readiness: Callable[[], str] | None = None
) -> Response | None:
    """The response for a plain GET of ``path`` (query string removed), or
    None (not ours: on to the handshake or 404). ``readiness`` returns "" when
    the node is ready, else why not (``/readyz``); without it ``/readyz``
    is not served."""
    if path == "/healthz":
        return _response(200, "OK", orjson.dumps({"status": "ok"}), _JSON)
    if path == "/readyz" and readiness is not None:
        why = readiness()
        if not why:
            return _response(200, "OK", orjson.dumps({"ready": True}), _JSON)
        body = orjson.dumps({"ready": False, "detail": why})
        return _response(503, "Service Unavailable", body, _JSON)
    if path == "/favicon.ico":
        return _response(204, "No Content", b"", None)
    if not demo and path in DEMO_PATHS:
        return None
    entry = _BODIES.get(path)
    if entry is None:
        return None
    body, ctype = entry
    return _response(200, "OK", body, ctype)


def _response(status: int, phrase: str, body: bytes, ctype: str | None) -> Response:
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Content-Length", str(len(body))),
            # The files change only with the server version; revalidate anyway
            # so an upgraded server is never paired with a stale client.
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
            ("Connection", "close"),
        ]
    )
    if ctype is not None:
        headers["Content-Type"] = ctype
    if ctype is not None and ctype.startswith("text/javascript"):
        # Module scripts load in CORS mode: let any page import the client.
        headers["Access-Control-Allow-Origin"] = "*"
    return Response(status, phrase, headers, body)
