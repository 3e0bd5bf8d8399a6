"""The kanban example's page in a real headless browser (Debian's chromium
through Playwright): two tabs on one board, a card added in one and dragged
in the other, both live; a third tab opened later shows the board as it is;
the service restarted under the pages and both catch up. Screenshot in
test-artifacts/."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.browser.test_board import (
    WAIT_MS,
    browser,  # noqa: F401 - the fixture
    pytestmark,  # noqa: F401 - the same skips (chromium, playwright)
)
from tests.examples.test_kanban import Service

try:
    from playwright.async_api import Browser, Page, expect
except ImportError:  # pragma: no cover - skipped by pytestmark
    pass

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


async def open_board(chromium: Browser, url: str, errors: list[str]) -> Page:
    ctx = await chromium.new_context(viewport={"width": 960, "height": 520})
    page = await ctx.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(url)
    await expect(page.locator("#status")).to_have_text("live", timeout=WAIT_MS)
    return page


async def test_two_tabs_drag_a_card_and_survive_a_restart(
    browser: Browser,  # noqa: F811
    tmp_path: Path,
) -> None:
    svc = Service(tmp_path / "data")
    await svc.start()
    errors: list[str] = []
    url = f"http://127.0.0.1:{svc.port}/?board=team"
    try:
        a = await open_board(browser, url, errors)
        b = await open_board(browser, url, errors)
        await a.fill("#title", "write the release notes")
        await a.click("#new button")
        await expect(b.locator('section[data-column="todo"] .card .title')).to_have_text(
            ["write the release notes"], timeout=WAIT_MS
        )
        # Drag it in tab B; tab A sees the move live.
        card = b.locator('section[data-column="todo"] .card').first
        await card.drag_to(b.locator('section[data-column="doing"]'))
        await expect(a.locator('section[data-column="doing"] .card .title')).to_have_text(
            ["write the release notes"], timeout=WAIT_MS
        )
        await expect(a.locator('section[data-column="todo"] .card')).to_have_count(0)
        # A tab opened now starts from the board as it is (snapshot + Position).
        c = await open_board(browser, url, errors)
        await expect(c.locator('section[data-column="doing"] .card .title')).to_have_text(
            ["write the release notes"], timeout=WAIT_MS
        )
        ARTIFACTS.mkdir(exist_ok=True)
        await b.screenshot(path=str(ARTIFACTS / "kanban-two-tabs.png"), full_page=True)

        # Restart the service under the pages: they reconnect (a fresh token
        # from the page's tokenProvider) and recover from their Position, so a
        # card added while they were away shows up in both.
        assert svc.proc is not None
        svc.proc.terminate()
        await svc.proc.wait()
        await svc.start()
        async with aiohttp.ClientSession() as http:
            body = {"title": "added during the outage"}
            async with http.post(
                f"http://127.0.0.1:{svc.port}/api/boards/team/cards", json=body
            ) as r:
                assert r.status == 201
        for page in (a, b):
            await expect(page.locator('section[data-column="todo"] .card .title')).to_have_text(
                ["added during the outage"], timeout=WAIT_MS
            )
            await expect(page.locator("#status")).to_have_text("live", timeout=WAIT_MS)
        await a.screenshot(path=str(ARTIFACTS / "kanban-after-restart.png"), full_page=True)
        assert errors == []
    finally:
        await svc.close()
