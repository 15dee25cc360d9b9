"""The dashboard at `/`, driven in headless Chromium (Playwright) like a person would."""

from __future__ import annotations

import pytest
from playwright.async_api import Browser, expect

from tests.e2e.browser import PageErrors, new_page
from tests.e2e.harness import Trader


@pytest.mark.timeout(90)
async def test_dashboard_logs_in_and_shows_the_traders_strategy(trader: Trader, browser: Browser) -> None:
    sid = await trader.strategy("INFY", buy_in_s=1800, sell_in_s=2400, stop_loss=1400, quantity=3)
    me = await trader.call("GET", "/me")
    errors = PageErrors()
    page = await new_page(browser, errors)
    await page.goto(trader.stack.api_url + "/")
    await page.fill("#login input[name=email]", me["email"])
    await page.fill("#login input[name=password]", "pass-word-123")
    await page.click("#login button[type=submit]")

    await expect(page.locator("#who")).to_contain_text(me["email"])
    await expect(page.locator("#b-valid .badge")).to_have_text("yes")
    row = page.locator(f'#rows tr[data-id="{sid}"]')
    await expect(row.locator("td.status .badge")).to_have_text("running")
    assert await row.locator("td").nth(0).text_content() == "INFY"
    assert await row.locator("td.actions button").all_text_contents() == ["Stop", "Stop and square off", "Orders"]
    assert await page.evaluate("sessionStorage.getItem('tickwise.token') !== null") is True

    # Stop it from the page: the status follows, and Delete appears once it no longer runs.
    await row.locator("td.actions button", has_text="Stop").first.click()
    await expect(row.locator("td.status .badge")).to_have_text("stopped")
    assert (await trader.status(sid))["status"] == "stopped"
    await expect(row.locator("td.actions button")).to_have_text(["Start", "Delete", "Orders"])

    await page.click("#logout")
    await expect(page.locator("#login")).to_be_visible()
    assert await page.evaluate("sessionStorage.getItem('tickwise.token')") is None
    await expect(page.locator("#rows > tr")).to_have_count(0)
    assert errors.items == []
