"""Protocol 1.1's subprotocol in a real browser: Debian's chromium (through
Playwright, as test_board.py) opens ``new WebSocket(url, "guildcast.v1")``
and gets it back in ``ws.protocol``; an offer of only unknown names fails
(a browser sees the 400 only as a failed connection); no offer is served
as in 1.0. The demo board's own guildcast.js offers it on every connection
(test_board.py, test_kanban.py)."""

from __future__ import annotations

from typing import Any

from guildcast import Server
from tests.browser.test_board import (
    browser,  # noqa: F401 - the fixture
    pytestmark,  # noqa: F401 - the same skips (chromium, playwright)
)

try:
    from playwright.async_api import Browser
except ImportError:  # pragma: no cover - skipped by pytestmark
    pass

#: Runs in the page: one connection with ``offer`` (null: none), HELLO,
#: IDENTIFY, READY; resolves with what the page saw.
OPEN = """async ([url, token, offer]) => new Promise((resolve) => {
  const ws = offer === null ? new WebSocket(url) : new WebSocket(url, offer);
  const got = [];
  ws.onerror = () => got.push("error");
  ws.onclose = (ev) => resolve({ protocol: ws.protocol, got, code: ev.code });
  ws.onmessage = (ev) => {
    const m = JSON.parse(ev.data);
    got.push(m.op === 10 ? "HELLO" : m.t);
    if (m.op === 10) ws.send(JSON.stringify({ op: 2, d: { token, guilds: {} } }));
    else { const protocol = ws.protocol; ws.close(); resolve({ protocol, got }); }
  };
})"""


async def test_chromium_subprotocol(browser: Browser, server: Server) -> None:  # noqa: F811
    page = await browser.new_page()
    await page.goto(server.url.replace("ws://", "http://").replace("/gateway", "/healthz"))
    tok = server.token("chromium")

    async def run(offer: Any) -> dict[str, Any]:
        got: dict[str, Any] = await page.evaluate(OPEN, [server.url, tok, offer])
        return got

    assert await run("guildcast.v1") == {"protocol": "guildcast.v1", "got": ["HELLO", "READY"]}
    both = await run(["chat", "guildcast.v1"])
    assert both == {"protocol": "guildcast.v1", "got": ["HELLO", "READY"]}
    assert await run(None) == {"protocol": "", "got": ["HELLO", "READY"]}
    refused = await run("chat")
    assert refused == {"protocol": "", "got": ["error"], "code": 1006}
