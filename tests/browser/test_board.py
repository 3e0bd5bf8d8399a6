"""The live board demo in a real headless browser: Debian's chromium driven
by Playwright. Two pages on one board; a card published in one shows up in
the other; the server is killed and restarted on the same port and both pages
reconnect by themselves. Screenshots go to test-artifacts/."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from guildcast.client import Client
from guildcast.core.tokens import make_token
from tests.support.node import SECRET, ServeProcess

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
#: Flags for a sandboxed root environment with no network but loopback
#: (without the background-networking ones chromium keeps dialling out).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Generous: a browser on two shared cores can be slow to start.
WAIT_MS = 30_000

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # pragma: no cover - depends on the environment
    async_playwright = None

pytestmark = [
    pytest.mark.skipif(
        not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} missing: apt-get install chromium"
    ),
    pytest.mark.skipif(
        async_playwright is None, reason="playwright missing: pip install -e '.[test]'"
    ),
]


class Board(ServeProcess):
    """``guildcast serve`` whose demo page a browser opens, restartable on its
    port. No HTTP API: the board does not use it."""

    def __init__(self, log: Path, extra: list[str]) -> None:
        args = ["--heartbeat-interval-ms", "5000", "--drain-timeout", "5", *extra]
        super().__init__(args, log, api=False)

    def token(self, sub: str) -> str:
        return make_token(SECRET, sub, ["*"], ["*"], None, 3600)

    def page_url(self, sub: str, guild: str) -> str:
        return f"http://127.0.0.1:{self.port}/#token={self.token(sub)}&guild={guild}"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert async_playwright is not None
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


async def open_board(
    browser: Browser,
    url: str,
    errors: list[str],
    before: Callable[[Page], None] | None = None,
) -> Page:
    """Open the page at ``url``; ``before`` sees the page before it loads
    (to watch its WebSockets, say)."""
    ctx = await browser.new_context(viewport={"width": 900, "height": 640})
    page = await ctx.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    if before is not None:
        before(page)
    await page.goto(url)
    await expect(page.locator("#status")).to_have_attribute(
        "data-state", "connected", timeout=WAIT_MS
    )
    return page


async def publish_card(page: Page, text: str) -> None:
    await page.fill("#card-text", text)
    await page.click("#publish")


async def cards(page: Page) -> list[str]:
    texts: list[str] = await page.locator("#cards .card").evaluate_all(
        "els => els.map(e => e.firstChild.textContent)"
    )
    return texts


async def expect_cards(page: Page, texts: list[str]) -> None:
    loc = page.locator("#cards .card")
    await expect(loc).to_have_count(len(texts), timeout=WAIT_MS)
    assert await cards(page) == texts


async def sessions(page: Page) -> int:
    n: Any = await page.evaluate("window.guildcastClient.sessions")
    return int(n)


async def wait_reconnected(page: Page) -> None:
    await expect(page.locator("#status")).to_have_attribute(
        "data-state", "connected", timeout=WAIT_MS
    )
    for _ in range(WAIT_MS // 50):  # bounded poll
        if await sessions(page) >= 2:
            break
        await asyncio.sleep(0.05)
    assert await sessions(page) >= 2, "the page did not reconnect"
    await expect(page.locator("#status")).to_have_attribute(
        "data-state", "connected", timeout=WAIT_MS
    )


async def test_board_live_across_tabs_and_a_restart(browser: Browser, tmp_path: Path) -> None:
    """Without --data-dir a restart starts a new history: both pages reconnect,
    are told (the resync notice), and keep working live."""
    srv = Board(tmp_path / "serve.log", [])
    await srv.start()
    errors: list[str] = []
    try:
        a = await open_board(browser, srv.page_url("alice", "board-1"), errors)
        b = await open_board(browser, srv.page_url("bob", "board-1"), errors)
        await publish_card(a, "hello from alice")
        await expect_cards(b, ["hello from alice"])
        await publish_card(b, "hi alice, bob here")
        await expect_cards(a, ["hello from alice", "hi alice, bob here"])
        await expect(b.locator("#cards .card").nth(1)).to_contain_text("by bob")
        ARTIFACTS.mkdir(exist_ok=True)
        await a.screenshot(path=str(ARTIFACTS / "board-two-tabs.png"), full_page=True)

        await srv.restart()
        for page in (a, b):
            await wait_reconnected(page)
            await expect(page.locator("#notice")).to_be_visible(timeout=WAIT_MS)
            await expect(page.locator("#cards .card.stale")).to_have_count(2)
        await publish_card(a, "after the restart")
        await expect_cards(b, ["hello from alice", "hi alice, bob here", "after the restart"])
        await expect_cards(a, ["hello from alice", "hi alice, bob here", "after the restart"])
        await b.screenshot(path=str(ARTIFACTS / "board-after-restart.png"), full_page=True)
    finally:
        await srv.close()
    assert errors == []


async def test_board_recovers_across_a_restart_with_data_dir(
    browser: Browser, tmp_path: Path
) -> None:
    """With --data-dir the restarted server continues the board's history:
    both pages reconnect and recover, including a card published while they
    were away, without a duplicate and without a resync."""
    srv = Board(tmp_path / "serve.log", ["--data-dir", str(tmp_path / "data")])
    await srv.start()
    errors: list[str] = []
    try:
        a = await open_board(browser, srv.page_url("alice", "board-1"), errors)
        b = await open_board(browser, srv.page_url("bob", "board-1"), errors)
        await publish_card(a, "one")
        await expect_cards(b, ["one"])
        await publish_card(b, "two")
        await expect_cards(a, ["one", "two"])

        await srv.restart()
        async with Client(f"ws://127.0.0.1:{srv.port}/gateway", srv.token("carol")) as c:
            await c.publish("board-1", "CARD_ADDED", {"text": "while away", "author": "carol"})
        for page in (a, b):
            await wait_reconnected(page)
            await expect_cards(page, ["one", "two", "while away"])
        await publish_card(b, "three")
        for page in (a, b):
            await expect_cards(page, ["one", "two", "while away", "three"])
            await expect(page.locator("#notice")).to_be_hidden()
        await a.screenshot(path=str(ARTIFACTS / "board-data-dir-restart.png"), full_page=True)
    finally:
        await srv.close()
    assert errors == []


async def test_a_second_tab_shows_the_cards_published_before_it_opened(
    browser: Browser, tmp_path: Path
) -> None:
    """Protocol 1.1 rewind (PROTOCOL.md "Rewind"): a tab opened after cards were
    published starts with them (published from another tab and from a
    backend client), in order, then gets new ones live; with ``--max-rewind
    2`` a new tab starts with the last two."""
    srv = Board(tmp_path / "serve.log", [])
    await srv.start()
    errors: list[str] = []
    try:
        a = await open_board(browser, srv.page_url("alice", "board-1"), errors)
        for text in ("one", "two", "three"):
            await publish_card(a, text)
        await expect_cards(a, ["one", "two", "three"])
        async with Client(f"ws://127.0.0.1:{srv.port}/gateway", srv.token("carol")) as c:
            await c.publish("board-1", "CARD_ADDED", {"text": "from a backend", "author": "carol"})
        await expect_cards(a, ["one", "two", "three", "from a backend"])

        b = await open_board(browser, srv.page_url("bob", "board-1"), errors)
        await expect_cards(b, ["one", "two", "three", "from a backend"])
        await expect(b.locator("#cards .card").nth(0)).to_contain_text("#1 by alice")
        await publish_card(b, "bob, live")
        for page in (a, b):
            await expect_cards(page, ["one", "two", "three", "from a backend", "bob, live"])
        await expect(b.locator("#notice")).to_be_hidden()
        ARTIFACTS.mkdir(exist_ok=True)
        await b.screenshot(path=str(ARTIFACTS / "board-second-tab-rewind.png"), full_page=True)
    finally:
        await srv.close()

    small = Board(tmp_path / "serve-small.log", ["--max-rewind", "2"])
    await small.start()
    try:
        async with Client(f"ws://127.0.0.1:{small.port}/gateway", small.token("carol")) as c:
            for text in ("w", "x", "y", "z"):
                await c.publish("board-2", "CARD_ADDED", {"text": text, "author": "carol"})
        late = await open_board(browser, small.page_url("dan", "board-2"), errors)
        await expect_cards(late, ["y", "z"])
    finally:
        await small.close()
    assert errors == []


async def serve_html(html: bytes) -> asyncio.Server:
    """A minimal HTTP server on loopback answering every GET with ``html``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(html), html)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def readme_browser_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"```html\n(<script type=\"module\">.*?</script>)\n```", text, re.S)
    assert m, "README.md has no ```html browser example"
    assert len([ln for ln in m.group(1).splitlines() if ln.strip()]) <= 10  # ten lines
    return m.group(1)


async def test_readme_browser_example_works(browser: Browser, tmp_path: Path) -> None:
    srv = Board(tmp_path / "serve.log", [])
    await srv.start()
    try:
        snippet = (
            readme_browser_example()
            .replace("127.0.0.1:8080", f"127.0.0.1:{srv.port}")
            .replace("TOKEN", srv.token("reader"))
        )
        ctx = await browser.new_context()
        page = await ctx.new_page()
        logs: list[str] = []
        errors: list[str] = []
        page.on("console", lambda msg: logs.append(msg.text))
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        # The application's own page, on another origin (port) than the
        # server: the module import must work cross-origin.
        html = f"<!doctype html><title>example</title>{snippet}".encode()
        app_page = await serve_html(html)
        try:
            await page.goto(f"http://127.0.0.1:{app_page.sockets[0].getsockname()[1]}/")
            for _ in range(WAIT_MS // 50):  # bounded poll
                if errors or any("CARD_ADDED" in line for line in logs):
                    break
                await asyncio.sleep(0.05)
        finally:
            app_page.close()
            await app_page.wait_closed()
        assert errors == []
        assert any(line.startswith('board-1 CARD_ADDED 1 {"text":"hi"}') for line in logs), logs
    finally:
        await srv.close()
