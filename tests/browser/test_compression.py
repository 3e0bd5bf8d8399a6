"""permessage-deflate in a real browser: Debian's chromium (through
Playwright, as test_board.py) offers the extension on every WebSocket; it
must get our parameters back in ``ws.extensions`` and decode the shared
compressed frames to exactly what an uncompressed client reads. The other
clients are in tests/integration/test_compression.py."""

from __future__ import annotations

import asyncio
from typing import Any

from guildcast import Server
from tests.browser.test_board import (
    browser,  # noqa: F401 - the fixture
    pytestmark,  # noqa: F401 - the same skips (chromium, playwright)
)
from tests.integration.test_compression import GID, MIX, check, deflate_connections

try:
    from playwright.async_api import Browser
except ImportError:  # pragma: no cover - skipped by pytestmark
    pass

#: Runs in the page: subscribe to ``gid``; ``window.ready`` once SUBSCRIBED;
#: resolves with the negotiated extensions and the next ``n`` DISPATCH texts.
SUBSCRIBE = """([url, token, gid, n]) => {
  window.ready = false;
  window.result = new Promise((resolve) => {
    const ws = new WebSocket(url);
    const out = [];
    ws.onmessage = (ev) => {
      const m = JSON.parse(ev.data);
      if (m.op === 10) ws.send(JSON.stringify({ op: 2, d: { token, guilds: { [gid]: null } } }));
      else if (m.t === "SUBSCRIBED") window.ready = true;
      else if (m.op === 0 && m.t !== "READY") {
        out.push(ev.data);
        if (out.length === n) { resolve({ extensions: ws.extensions, out }); ws.close(); }
      }
    };
  });
}"""


async def test_chromium_negotiates_and_decodes(browser: Browser, server: Server) -> None:  # noqa: F811
    page = await browser.new_page()
    await page.goto(server.url.replace("ws://", "http://").replace("/gateway", "/healthz"))
    extensions = ""

    async def client(ready: asyncio.Event) -> list[str]:
        nonlocal extensions
        await page.evaluate(SUBSCRIBE, [server.url, server.token("chromium"), GID, len(MIX)])
        await page.wait_for_function("window.ready === true", timeout=30_000)
        assert deflate_connections(server) == 1
        ready.set()
        got: dict[str, Any] = await page.evaluate("window.result")
        extensions = got["extensions"]
        out: list[str] = got["out"]
        return out

    assert await check(server, client)
    assert "permessage-deflate" in extensions and "server_no_context_takeover" in extensions
