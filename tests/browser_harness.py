"""Headless Chromium driven through the DevTools protocol (CDP), for the live page's tests.

CDP is JSON-RPC over one WebSocket, so this speaks it with aiohttp's client (already a
dependency) in about a hundred lines. The Python CDP libraries on the index were either
stale (chrome-devtools-protocol, pychrome: years without a release) or heavy and tied to
their own browser builds (playwright ships a Node driver and expects browsers it
downloads, which this project's machines cannot fetch); Debian's `chromium` is what CI has.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def ensure_chromium() -> str:
    """Chromium's path; installs Debian's package when missing and root can; else skips with why."""
    found = find_chromium()
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("no chromium on PATH and no root apt-get to install it (`apt-get install chromium`; .ci/run does)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600, check=False)
    run = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], env=env,
                         capture_output=True, text=True, timeout=900, check=False)
    found = find_chromium()
    if found is None:
        pytest.skip(f"chromium is not installed and `apt-get install chromium` failed: {run.stderr.strip()[-300:]}")
    return found


class Chromium:
    """One headless Chromium process with a throwaway profile (fresh localStorage per test)."""

    def __init__(self, binary: str):
        self.binary = binary
        self.profile = tempfile.mkdtemp(prefix="tickwave-chromium-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    async def start(self, timeout: float = 30) -> Chromium:
        args = [
            self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
            # a page in a headless window is never "visible": without these its timers slow to 1/s
            "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
            "--disable-backgrounding-occluded-windows",
            "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
            f"--user-data-dir={self.profile}", "about:blank",
        ]
        # own process group: the browser's helpers go with it when the test kills it
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"chromium exited with {self.proc.returncode} before opening its DevTools port")
            with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                self.port = int(port_file.read_text().splitlines()[0])
                return self
            await asyncio.sleep(0.05)
        pytest.fail(f"chromium opened no DevTools port within {timeout}s")

    async def page(self) -> Page:
        """The browser's first tab, attached."""
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 15
            while True:
                async with s.get(f"http://127.0.0.1:{self.port}/json/list") as r:
                    tabs = [t for t in await r.json() if t.get("type") == "page"]
                if tabs or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
        if not tabs:
            pytest.fail("chromium has no tab to drive")
        return await Page(tabs[0]["webSocketDebuggerUrl"]).attach()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """A CDP session on one tab: evaluate, wait, click, and every JS error the page raised."""

    def __init__(self, ws_url: str):
        self.ws_url = ws_url
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.exceptions: list[str] = []   # uncaught exceptions and rejected promises
        self.console_errors: list[str] = []  # console.error / console.assert from the page's script
        self.log_entries: list[dict[str, Any]] = []  # the browser's own log (network failures, ...)

    async def attach(self) -> Page:
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(self.ws_url, max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        for domain in ("Runtime", "Log", "Page"):
            await self.send(f"{domain}.enable")
        return self

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._ws.close()
        await self._session.close()

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            doc = json.loads(msg.data)
            if "id" in doc:
                fut = self._pending.pop(doc["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(doc)
                continue
            method, params = doc.get("method"), doc.get("params", {})
            if method == "Runtime.exceptionThrown":
                d = params["exceptionDetails"]
                self.exceptions.append(d.get("exception", {}).get("description") or d.get("text", "?"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                self.console_errors.append(" ".join(str(a.get("value", a.get("description", "")))
                                                    for a in params.get("args", [])))
            elif method == "Log.entryAdded":
                self.log_entries.append(params["entry"])
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError("the DevTools connection closed"))

    async def send(self, method: str, timeout: float = 15, **params: Any) -> dict[str, Any]:
        n = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[n] = fut
        await self._ws.send_str(json.dumps({"id": n, "method": method, "params": params}))
        doc = await asyncio.wait_for(fut, timeout)
        if "error" in doc:
            raise RuntimeError(f"{method}: {doc['error']}")
        return doc["result"]

    async def evaluate(self, expression: str) -> Any:
        """The value of a JS expression (promises awaited), as JSON."""
        got = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in got:
            d = got["exceptionDetails"]
            raise RuntimeError(f"{expression!r} threw: {d.get('exception', {}).get('description') or d.get('text')}")
        return got["result"].get("value")

    async def goto(self, url: str, timeout: float = 15) -> None:
        """A fresh load of `url` (through about:blank, so a URL differing only by #fragment reloads too)."""
        await self.send("Page.navigate", url="about:blank")
        await self.wait_for("location.href === 'about:blank' && document.readyState === 'complete'", "about:blank")
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete' && location.href.startsWith(%s)" % json.dumps(url.split("#")[0]),
                            f"{url} loaded", timeout)

    async def wait_for(self, expression: str, reason: str, timeout: float = 10) -> Any:
        """Polls a JS expression until it is truthy; fails naming `reason` and the last value seen."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value:
                return value
            await asyncio.sleep(0.05)
        pytest.fail(f"timed out after {timeout}s waiting for {reason} ({expression} was {value!r})")

    async def wait_value(self, expression: str, expected: Any, reason: str, timeout: float = 10) -> Any:
        """Polls a JS expression until its value equals `expected` (compared in Python)."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = await self.evaluate(expression)
            if value == expected:
                return value
            await asyncio.sleep(0.05)
        pytest.fail(f"timed out after {timeout}s waiting for {reason}: expected {expected!r}, last saw {value!r}")

    async def text(self, selector: str) -> str | None:
        return await self.evaluate(f"document.querySelector({json.dumps(selector)})?.textContent ?? null")

    async def wait_text(self, selector: str, expected: str, timeout: float = 10) -> str:
        """Waits until `selector`'s text contains `expected`."""
        sel, want = json.dumps(selector), json.dumps(expected)
        return await self.wait_for(f"(document.querySelector({sel})?.textContent ?? '').includes({want}) && "
                                   f"document.querySelector({sel}).textContent",
                                   f"{selector} to show {expected!r}", timeout)

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element (pressed and released)."""
        box = await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()")
        if box is None:
            pytest.fail(f"nothing to click at {selector}")
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)

    async def select(self, selector: str, value: str) -> None:
        """Picks an option of a <select> as a user would: value set, `change` fired."""
        ok = await self.evaluate(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            f" if (!e || ![...e.options].some((o) => o.value === {json.dumps(value)})) return false;"
            f" e.value = {json.dumps(value)}; e.dispatchEvent(new Event('change', {{bubbles: true}})); return true; }})()")
        if not ok:
            pytest.fail(f"{selector} has no option {value!r}")

    def js_errors(self) -> list[str]:
        """Everything the page's own script raised or logged as an error."""
        browser = [f"{e.get('source')}: {e.get('text')}" for e in self.log_entries
                   if e.get("level") == "error" and e.get("source") in ("javascript", "security", "deprecation")]
        return self.exceptions + self.console_errors + browser
