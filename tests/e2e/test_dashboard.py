"""The dashboard at `/`, driven in headless Chromium (Playwright) like a person would.

The story test also takes the README's screenshots: into a temporary folder,
or into docs/screenshots/ with `make screenshots` (TICKWISE_SCREENSHOTS set),
so an ordinary test run leaves the checkout as it was.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from uuid import uuid4

import aiohttp
import pytest
from playwright.async_api import Browser, Page, expect

from tests.e2e.browser import PageErrors, new_page
from tests.e2e.harness import Stack, Trader, ist_clock

PASSWORD = "pass-word-123"


def rupees(value: float) -> str:
    sign = "+" if value > 0 else "−" if value < 0 else ""
    return f"{sign}₹{abs(value):,.2f}"


def row(page: Page, symbol: str):  # a Playwright Locator
    return page.locator("#rows > tr[data-id]", has=page.locator("td.symbol", has_text=symbol))


async def fill_strategy(page: Page, symbol: str, stop_loss: str, quantity: str, buy_in_s: int) -> None:
    form = page.locator("#create")
    await form.locator("input[name=symbol]").fill(symbol)
    await form.locator("input[name=buy_time]").fill(ist_clock(buy_in_s))
    await form.locator("input[name=sell_time]").fill(ist_clock(300))
    await form.locator("input[name=stop_loss]").fill(stop_loss)
    await form.locator("input[name=quantity]").fill(quantity)


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    """Where the story's screenshots go: docs/screenshots/ only when asked for."""
    return Path(os.environ["TICKWISE_SCREENSHOTS"]) if os.environ.get("TICKWISE_SCREENSHOTS") else tmp_path


@pytest.mark.timeout(120)
async def test_trader_story_live_in_the_browser(e2e_stack: Stack, http: aiohttp.ClientSession,
                                                browser: Browser, screenshots: Path) -> None:
    trader = Trader(http, e2e_stack)
    errors = PageErrors()
    page = await new_page(browser, errors)
    await page.goto(e2e_stack.api_url + "/")
    email = f"story-{uuid4().hex[:8]}@example.com"
    await page.fill("#register input[name=name]", "Asha Rao")
    await page.fill("#register input[name=email]", email)
    await page.fill("#register input[name=password]", PASSWORD)
    await page.click("#register button[type=submit]")
    await expect(page.locator("#who")).to_contain_text(email)
    await page.evaluate("window.__sameDocument = true")
    trader.token = await page.evaluate("sessionStorage.getItem('tickwise.token')")
    await expect(page.locator("#mode")).to_have_text("PAPER TRADING")
    await expect(page.locator("#live")).to_have_text("● Live")

    # Connect the paper broker through the form.
    trader.account = await trader.sim("POST", "accounts", {"user_name": "Asha Rao"})
    await page.click("#broker details > summary")
    for name in ("api_key", "api_secret", "access_token"):
        await page.fill(f"#connect input[name={name}]", trader.account[name])
    await page.click("#connect button[type=submit]")
    await expect(page.locator("#b-valid .badge")).to_have_text("Valid")

    # Creating: the stop-loss warning names the current price; errors sit next to their field, in words.
    await trader.tick("TATAMOTORS", 780)
    await trader.tick("HINDUNILVR", 2450)
    await fill_strategy(page, "TATAMOTORS", "900", "0", buy_in_s=12)
    # The paper market walks: whatever price the page shows, the warning names that same price.
    await expect(page.locator("#quote")).to_have_text(re.compile(r"^Current price ₹7\d\d\.\d\d$"))
    shown = (await page.inner_text("#quote")).removeprefix("Current price ")
    await expect(page.locator("#sl-warn")).to_contain_text(f"Stop-loss ₹900.00 is at or above the current price {shown}")
    await page.click("#create button[type=submit]")
    await expect(page.locator("#create label:has(input[name=quantity]) .field-err")).to_have_text("must be at least 1")
    await page.screenshot(path=str(screenshots / "strategy-form.png"))
    text = await page.inner_text("body")
    assert "Input should" not in text and "Value error" not in text
    await page.fill("#create input[name=stop_loss]", "760")
    await expect(page.locator("#sl-warn")).to_be_hidden()
    await page.fill("#create input[name=quantity]", "5")
    await page.click("#create button[type=submit]")
    await expect(row(page, "TATAMOTORS").locator("td.status .badge")).to_have_text("Not started")
    await fill_strategy(page, "HINDUNILVR", "2300", "2", buy_in_s=12)
    await page.click("#create button[type=submit]")
    hul = row(page, "HINDUNILVR")
    await expect(hul.locator("td.status .badge")).to_have_text("Not started")

    # Edit the second before it starts, then start both.
    await hul.locator("button", has_text="Edit").click()
    await page.fill("#create input[name=quantity]", "3")
    await page.click("#create button[type=submit]")
    await expect(hul.locator("td").nth(4)).to_have_text("3")
    tata = row(page, "TATAMOTORS")
    for strategy in (tata, hul):
        await strategy.locator("button", has_text="Start").click()
        await expect(strategy.locator("td.status .badge")).to_have_text("Running")
    await expect(tata.locator("td.next")).to_contain_text("Buy ·")

    # Bought, then stopped out by a pushed tick: shown live, as a loss.
    await expect(tata.locator("td.position .badge")).to_have_text("Holding", timeout=30_000)
    await expect(hul.locator("td.position .badge")).to_have_text("Holding", timeout=30_000)
    await expect(tata.locator("td.next")).to_contain_text("Sell ·")
    await trader.tick("TATAMOTORS", 750)
    await expect(tata.locator("td.position .badge")).to_have_text("Stopped out", timeout=20_000)
    await expect(tata.locator("td.position .badge")).to_have_class("badge loss")
    await expect(tata.locator("td.status .badge")).to_have_text("Finished", timeout=20_000)

    # Square off the other from the page.
    await hul.locator("button", has_text="Stop and square off").click()
    await expect(hul.locator("td.position .badge")).to_have_text("Sold", timeout=20_000)
    await expect(hul.locator("td.status .badge")).to_have_text("Stopped")

    # Every number on the page is the broker's.
    fills = {(o["tradingsymbol"], o["transaction_type"]): o for o in await trader.broker_orders()
             if o["status"] == "COMPLETE"}
    expected = {}
    for symbol, qty, locator in (("TATAMOTORS", 5, tata), ("HINDUNILVR", 3, hul)):
        buy, sell = fills[(symbol, "BUY")], fills[(symbol, "SELL")]
        expected[symbol] = round((sell["average_price"] - buy["average_price"]) * qty, 2)
        await expect(locator.locator("td").nth(7)).to_have_text(f"{buy['average_price']:,.2f}")
        await expect(locator.locator("td").nth(8)).to_have_text(f"{sell['average_price']:,.2f}")
        await expect(locator.locator("td").nth(10)).to_have_text(rupees(expected[symbol]))
    assert expected["TATAMOTORS"] < 0
    await expect(page.locator("#s-realized")).to_have_text(rupees(round(sum(expected.values()), 2)))
    await expect(page.locator("#trade-rows > tr")).to_have_count(4)
    await expect(page.locator("#pos-rows > tr")).to_have_count(2)
    assert await page.evaluate("window.__sameDocument === true"), "the page reloaded"

    await tata.locator("button", has_text="Orders").click()
    await expect(page.locator("#rows > tr.log")).to_contain_text("Stop-loss exit")
    await page.screenshot(path=str(screenshots / "dashboard.png"), full_page=True)

    # Notifications: the webhook's signing secret is shown once, right after saving.
    await page.fill("#notify input[name=webhook_url]", "http://127.0.0.1:9/tickwise-hook")
    await page.click("#notify button[type=submit]")
    await expect(page.locator("#notify-secret")).to_contain_text("Signing secret (shown once): whsec_")
    assert (await trader.call("GET", "/notifications"))["webhook_secret"] is None
    assert errors.items == []

    docs = await new_page(browser, errors)
    await docs.goto(e2e_stack.api_url + "/docs")
    await expect(docs.locator(".swagger-ui .info .title")).to_contain_text("Tickwise API")
    await expect(docs.locator(".opblock-summary-path", has_text="/api/v1/positions")).to_be_visible()
    await docs.screenshot(path=str(screenshots / "api-reference.png"))
    assert errors.items == []


@pytest.mark.timeout(90)
async def test_dashboard_logs_in_and_shows_the_traders_strategy(trader: Trader, browser: Browser) -> None:
    sid = await trader.strategy("INFY", buy_in_s=300, sell_in_s=360, stop_loss=1400, quantity=3)
    me = await trader.call("GET", "/me")
    errors = PageErrors()
    page = await new_page(browser, errors)
    await page.goto(trader.stack.api_url + "/")
    await page.fill("#login input[name=email]", me["email"])
    await page.fill("#login input[name=password]", PASSWORD)
    await page.click("#login button[type=submit]")

    await expect(page.locator("#who")).to_contain_text(me["email"])
    await expect(page.locator("#b-valid .badge")).to_have_text("Valid")
    strategy = page.locator(f'#rows tr[data-id="{sid}"]')
    await expect(strategy.locator("td.status .badge")).to_have_text("Running")
    await expect(strategy.locator("td.position .badge")).to_have_text("No position")
    assert await strategy.locator("td.actions button").all_text_contents() == ["Stop", "Stop and square off", "Orders"]
    assert await page.evaluate("sessionStorage.getItem('tickwise.token') !== null") is True

    # Stop it from the page: the status follows, and Edit and Delete appear once it no longer runs.
    await strategy.locator("td.actions button", has_text="Stop").first.click()
    await expect(strategy.locator("td.status .badge")).to_have_text("Stopped")
    assert (await trader.status(sid))["status"] == "stopped"
    await expect(strategy.locator("td.actions button")).to_have_text(["Start", "Edit", "Delete", "Orders"])

    # Start it again, then press the kill switch (the confirm dialog is accepted): everything stops.
    await strategy.locator("td.actions button", has_text="Start").click()
    await expect(strategy.locator("td.status .badge")).to_have_text("Running")
    await page.click("#kill")
    await expect(page.locator("#broker-msg")).to_have_text("Kill switch used: 1 stopped, 0 squaring off.")
    await expect(strategy.locator("td.status .badge")).to_have_text("Stopped")

    await page.click("#logout")
    await expect(page.locator("#login")).to_be_visible()
    assert await page.evaluate("sessionStorage.getItem('tickwise.token')") is None
    await expect(page.locator("#rows > tr")).to_have_count(0)
    assert errors.items == []
