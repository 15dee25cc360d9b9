"""The dashboard at `/`, driven in headless Chromium over the DevTools protocol like a person would.

Skipped cleanly where Chromium is not installed (CI machines may not have it); `CHROMIUM=/path`
picks another Chromium-based browser.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.harness import Trader

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")


class CdpError(AssertionError):
    pass


class Browser:
    """One headless Chromium page over the Chrome DevTools protocol (aiohttp websocket, no extra deps)."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session
        self.profile = tempfile.mkdtemp(prefix="tickwise-chromium-")
        self.proc: asyncio.subprocess.Process | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.reader: asyncio.Task[None] | None = None

    async def start(self, width: int = 1280, height: int = 900) -> Browser:
        self.proc = await asyncio.create_subprocess_exec(
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--remote-debugging-port=0", f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
            "about:blank",
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 15
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.returncode is not None:
                raise CdpError("chromium did not open its DevTools port")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as resp:
            pages = [t for t in await resp.json() if t["type"] == "page"]
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        self.reader = asyncio.create_task(self._read())
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable")
        return self

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data:
                fut = self.waiting.pop(data["id"], None)
                if fut and not fut.done():
                    fut.set_result(data)
            elif data.get("method") == "Page.javascriptDialogOpening":
                self.dialogs.append(data["params"]["message"])  # a person reads it and presses OK
                await self.ws.send_json({"id": next(self.ids), "method": "Page.handleJavaScriptDialog",
                                         "params": {"accept": True}})
            elif data.get("method") == "Runtime.exceptionThrown":
                self.errors.append(json.dumps(data["params"]["exceptionDetails"])[:500])
            elif data.get("method") == "Log.entryAdded" and data["params"]["entry"]["level"] == "error" \
                    and data["params"]["entry"]["source"] != "network":  # 4xx answers are shown, not errors
                self.errors.append(data["params"]["entry"]["text"])

    async def send(self, method: str, **params: Any) -> Any:
        assert self.ws is not None
        mid = next(self.ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[mid] = fut
        await self.ws.send_json({"id": mid, "method": method, "params": params})
        data = await asyncio.wait_for(fut, 10)
        if "error" in data:
            raise CdpError(f"{method}: {data['error']}")
        return data["result"]

    async def js(self, expression: str) -> Any:
        out = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            raise CdpError(f"{expression!r}: {out['exceptionDetails']}")
        return out["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 8) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if await self.js(f"!!({expression})"):
                return
            if time.monotonic() > deadline:
                raise CdpError(f"timed out waiting for {expression!r}; page says: "
                               f"{await self.js('document.body.innerText')!r}")
            await asyncio.sleep(0.1)

    async def open(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete' && !!document.getElementById('login')")

    async def type(self, selector: str, text: str) -> None:
        """Focus a field and type into it, as keystrokes would."""
        await self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        await self.send("Input.insertText", text=text)

    async def click(self, selector: str) -> None:
        await self.js(f"document.querySelector({json.dumps(selector)}).click()")

    async def screenshot(self, path: str | Path) -> None:
        out = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        await asyncio.to_thread(Path(path).write_bytes, base64.b64decode(out["data"]))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.send("Browser.close"), 3)
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            self.reader.cancel()
        if self.proc is not None:
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


ROWS = """JSON.stringify([...document.querySelectorAll('#rows > tr[data-id]')].map(tr => ({
  id: tr.dataset.id, symbol: tr.cells[0].textContent, status: tr.querySelector('td.status .badge').textContent,
  position: tr.cells[6].textContent, buttons: [...tr.querySelectorAll('button')].map(b => b.textContent)})))"""


@pytest.mark.timeout(60)
async def test_dashboard_logs_in_and_shows_the_traders_strategy(trader: Trader, http: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    sid = await trader.strategy("INFY", buy_in_s=1800, sell_in_s=2400, stop_loss=1400, quantity=3)
    me = await trader.call("GET", "/me")
    browser = Browser(http)
    try:
        await browser.start()
        await browser.open(trader.stack.api_url + "/")
        await browser.type("#login input[name=email]", me["email"])
        await browser.type("#login input[name=password]", "pass-word-123")
        await browser.click("#login button[type=submit]")

        await browser.wait_for(f"document.getElementById('who').textContent.includes({json.dumps(me['email'])})")
        await browser.wait_for("document.querySelector('#b-valid .badge')?.textContent === 'yes'")
        await browser.wait_for(f"!!document.querySelector('#rows tr[data-id=\"{sid}\"] .badge')")
        rows = json.loads(await browser.js(ROWS))
        assert [(r["id"], r["symbol"], r["status"], r["position"]) for r in rows] == [(sid, "INFY", "running", "none")]
        assert rows[0]["buttons"] == ["Stop", "Stop and square off", "Orders"]
        assert await browser.js("sessionStorage.getItem('tickwise.token') !== null") is True

        # Stop it from the page: the status follows, and Delete appears once it no longer runs.
        await browser.click(f"#rows tr[data-id=\"{sid}\"] td.actions button")
        await browser.wait_for(f"document.querySelector('#rows tr[data-id=\"{sid}\"] .badge').textContent"
                               " === 'stopped'")
        assert (await trader.status(sid))["status"] == "stopped"
        rows = json.loads(await browser.js(ROWS))
        assert rows[0]["buttons"] == ["Start", "Delete", "Orders"]

        await browser.click("#logout")
        await browser.wait_for("!document.getElementById('login').closest('.hidden')")
        assert await browser.js("sessionStorage.getItem('tickwise.token')") is None
        assert await browser.js("document.getElementById('rows').children.length") == 0
        assert browser.errors == []
    finally:
        await browser.close()
    assert time.monotonic() - started < 20
