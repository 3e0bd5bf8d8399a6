"""The demo board's failure cases in a real browser (issue "First run and
operations"): an invalid guild id and a refused token each end with a
message on the page and the setup form, from which another guild or token
connects; nothing is left as an uncaught error."""

from __future__ import annotations

from pathlib import Path

from guildcast.core.tokens import make_token
from tests.browser.test_board import (
    WAIT_MS,
    Board,
    browser,  # noqa: F401 - the fixture
    pytestmark,  # noqa: F401 - the same skips (chromium, playwright)
)

try:
    from playwright.async_api import Browser, Page, expect
except ImportError:  # pragma: no cover - skipped by pytestmark
    pass


async def new_page(chromium: Browser, url: str, errors: list[str]) -> Page:
    ctx = await chromium.new_context(viewport={"width": 900, "height": 640})
    page = await ctx.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(url)
    return page


async def test_invalid_guild_id_says_so_and_another_connects(
    browser: Browser,  # noqa: F811
    tmp_path: Path,
) -> None:
    srv = Board(tmp_path / "serve.log", [])
    await srv.start()
    errors: list[str] = []
    try:
        page = await new_page(browser, srv.page_url("alice", "no%20spaces!"), errors)
        await expect(page.locator("#error")).to_be_visible(timeout=WAIT_MS)
        await expect(page.locator("#error")).to_contain_text("not a valid board")
        await expect(page.locator("#setup")).to_be_visible()
        await expect(page.locator("#status")).to_have_attribute("data-state", "closed")
        # The token is kept in the form; only the guild needs fixing.
        await page.fill("#guild-input", "board-ok")
        await page.click("#setup-form button")
        await expect(page.locator("#status")).to_have_attribute(
            "data-state", "connected", timeout=WAIT_MS
        )
        await expect(page.locator("#guild-name")).to_contain_text("board-ok")
    finally:
        await srv.close()
    assert errors == []


async def test_refused_token_asks_for_another(
    browser: Browser,  # noqa: F811
    tmp_path: Path,
) -> None:
    srv = Board(tmp_path / "serve.log", [])
    await srv.start()
    errors: list[str] = []
    wrong = make_token("another-servers-secret-0123456789abcdef", "eve", ["*"], ["*"], None, 3600)
    try:
        page = await new_page(
            browser, f"http://127.0.0.1:{srv.port}/#token={wrong}&guild=board-1", errors
        )
        await expect(page.locator("#status")).to_have_attribute(
            "data-state", "closed", timeout=WAIT_MS
        )
        await expect(page.locator("#status")).to_contain_text("4004")
        await expect(page.locator("#error")).to_contain_text("refused this token")
        await expect(page.locator("#setup")).to_be_visible()
        await page.fill("#token-input", srv.token("alice"))
        await page.click("#setup-form button")
        await expect(page.locator("#status")).to_have_attribute(
            "data-state", "connected", timeout=WAIT_MS
        )
        await expect(page.locator("#status")).to_contain_text("alice")
        await expect(page.locator("#error")).to_be_hidden()
    finally:
        await srv.close()
    assert errors == []
