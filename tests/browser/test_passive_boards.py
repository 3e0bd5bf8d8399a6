"""The demo board's board list in a real browser: the board shown is
subscribed active, the others passively (docs/PROTOCOL.md, "Passive
subscriptions"); cards published to a passive board show as an unread
count, and showing that board replays exactly them."""

from __future__ import annotations

from pathlib import Path

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
    from playwright.async_api import Browser, expect
except ImportError:  # pragma: no cover - skipped by pytestmark
    pass


async def test_passive_boards_count_unread_and_replay_when_shown(
    browser: Browser,  # noqa: F811
    tmp_path: Path,
) -> None:
    srv = Board(tmp_path / "serve.log", ["--passive-interval", "0.2"])
    await srv.start()
    errors: list[str] = []
    try:
        url = srv.page_url("ann", "home") + "&boards=side"
        reader = await open_board(browser, url, errors)
        writer = await open_board(browser, srv.page_url("bob", "side"), errors)
        side = reader.locator('#boards li[data-board="side"]')
        await expect(side).to_have_attribute("data-active", "false", timeout=WAIT_MS)
        for text in ("one", "two", "three"):
            await publish_card(writer, text)
        await expect_cards(writer, ["one", "two", "three"])
        # The passive board shows how many cards are new, and none of them.
        await expect(side.locator(".unread")).to_have_text("3", timeout=WAIT_MS)
        await expect_cards(reader, [])
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
