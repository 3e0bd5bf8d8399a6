"""The demo board's board list in a real browser: the board shown is
subscribed active, the others passively (docs/PROTOCOL.md, "Passive
subscriptions"); cards published to a passive board show as an unread
count, and showing that board replays exactly them. The page asks for
batched notices (IDENTIFY ``activity_batch``) and gets them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.browser.test_board import (
    WAIT_MS,
    Board,
    browser,  # noqa: F401 - the fixture
    expect_cards,
    open_board,
    publish_card,
    pytestmark,  # noqa: F401 - the same skips (chromium, playwright)
)

try:
    from playwright.async_api import Browser, Page, WebSocket, expect
except ImportError:  # pragma: no cover - skipped by pytestmark
    pass


def record_frames(page: Page, sent: list[Any], received: list[Any]) -> None:
    """Keep every JSON text frame the page's WebSockets send and receive."""

    def on_socket(ws: WebSocket) -> None:
        ws.on("framesent", lambda payload: _keep(payload, sent))
        ws.on("framereceived", lambda payload: _keep(payload, received))

    page.on("websocket", on_socket)


def _keep(payload: str | bytes, into: list[Any]) -> None:
    if isinstance(payload, str):
        into.append(json.loads(payload))


async def test_passive_boards_count_unread_and_replay_when_shown(
    browser: Browser,  # noqa: F811
    tmp_path: Path,
) -> None:
    srv = Board(tmp_path / "serve.log", ["--passive-interval", "0.2"])
    await srv.start()
    errors: list[str] = []
    try:
        url = srv.page_url("ann", "home") + "&boards=side"
        sent: list[Any] = []
        received: list[Any] = []
        reader = await open_board(browser, url, errors, lambda p: record_frames(p, sent, received))
        writer = await open_board(browser, srv.page_url("bob", "side"), errors)
        side = reader.locator('#boards li[data-board="side"]')
        await expect(side).to_have_attribute("data-active", "false", timeout=WAIT_MS)
        for text in ("one", "two", "three"):
            await publish_card(writer, text)
        await expect_cards(writer, ["one", "two", "three"])
        # The passive board shows how many cards are new, and none of them.
        await expect(side.locator(".unread")).to_have_text("3", timeout=WAIT_MS)
        await expect_cards(reader, [])
        # It came as a batched notice (no "g": a guild -> head map), which
        # the page's IDENTIFY asked for.
        identify = [m for m in sent if m.get("op") == 2]
        assert identify and identify[0]["d"].get("activity_batch") is True
        notices = [m for m in received if m.get("t") == "GUILD_ACTIVITY"]
        assert notices and all("g" not in m and isinstance(m["d"], dict) for m in notices)
        assert notices[-1]["d"].get("side") == 3
        # Shown, it replays exactly those, then live ones; home goes passive.
        await side.locator("button").click()
        await expect_cards(reader, ["one", "two", "three"])
        await expect(side).to_have_attribute("data-active", "true")
        await publish_card(writer, "four")
        await expect_cards(reader, ["one", "two", "three", "four"])
        home = reader.locator('#boards li[data-board="home"]')
        await expect(home).to_have_attribute("data-active", "false")
    finally:
        await srv.close()
    assert errors == []
