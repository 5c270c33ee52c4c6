"""The live page (edge/static/index.html) as a test reads and drives it, plus the stream side.

Page side: what the page shows (state, resume line, table, breadth bar, K-line candles) and
what it received (`window.__tickwave`: every event id, each `subscribed` frame, errors).
Stream side: appending events and reading the stream's ids back with XRANGE.

Extending for breadth and K-lines once their writers land: append with the writer, then
`await live.wait_breadth(expected_rows)` / `await live.wait_candles(n)`; the page reads
below already follow the contracts (docs in /work/notes/contracts.md).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from schemas.events import PriceChange
from streams.events import EventLog
from tests.browser_harness import Page

# what the page exposes; one expression so a failing wait shows the whole picture
TABLE_JS = """[...document.querySelectorAll('#rows tr')].map((tr) => {
  const cell = (f) => tr.querySelector(`td[data-field="${f}"]`);
  return {ts_code: tr.dataset.code, code: cell('code').textContent, name: cell('name').textContent,
          price: cell('price').textContent, price_class: cell('price').className, pct: cell('pct').textContent,
          flash: tr.dataset.flash || null};
})"""
BREADTH_JS = """Object.fromEntries([...document.querySelectorAll('#breadth .nums')].map((n) =>
  [n.dataset.board, Object.fromEntries([...n.querySelectorAll('span')].map((s) => [s.dataset.field, s.textContent]))]))"""


class LivePage:
    def __init__(self, page: Page, base: str):
        self.page, self.base = page, base

    async def open(self, fragment: str = "") -> None:
        await self.page.goto(self.base + "/" + fragment)

    # --- what it shows ---
    async def state(self) -> str | None:
        return await self.page.text("#state")

    async def resume(self) -> str | None:
        return await self.page.text("#resume")

    async def options(self) -> list[str]:
        return await self.page.evaluate("[...document.querySelectorAll('#strategy option')].map((o) => o.value)")

    async def table(self) -> dict[str, dict[str, Any]]:
        return {r["ts_code"]: r for r in await self.page.evaluate(TABLE_JS)}

    async def prices(self) -> dict[str, str]:
        return {code: row["price"] for code, row in (await self.table()).items()}

    async def breadth(self) -> dict[str, dict[str, str]]:
        """Per board, the numbers the breadth bar shows (advancers "↑12", limit_up "涨停 3", ...)."""
        return await self.page.evaluate(BREADTH_JS)

    async def breadth_hidden(self) -> bool:
        return await self.page.evaluate("document.getElementById('breadth').hidden")

    async def kline(self) -> dict[str, Any] | None:
        """The clicked stock's K-line as drawn: bars, candle colours (up/down/flat) and status."""
        return await self.page.evaluate("window.__tickwave.kline")

    # --- what it received ---
    async def event_ids(self) -> list[str]:
        """Every event id received in live or replayed frames (snapshots excluded), in arrival order."""
        return await self.page.evaluate("window.__tickwave.events")

    async def subscribed(self) -> list[dict[str, Any]]:
        return await self.page.evaluate("window.__tickwave.subscribed")

    async def errors(self) -> list[dict[str, Any]]:
        return await self.page.evaluate("window.__tickwave.errors")

    async def feed(self, frame: dict[str, Any]) -> None:
        """Hands the page one server frame as if the socket had delivered it (a contract check)."""
        await self.page.evaluate(f"onFrame({json.dumps(json.dumps(frame))})")

    # --- waits ---
    async def wait_state(self, text: str, timeout: float = 10) -> str:
        return await self.page.wait_text("#state", text, timeout)

    async def wait_resume(self, text: str, timeout: float = 10) -> str:
        return await self.page.wait_text("#resume", text, timeout)

    async def wait_prices(self, expected: dict[str, str], timeout: float = 10) -> None:
        """Waits until the table shows exactly these prices (every row, no other row)."""
        await self.page.wait_value(f"Object.fromEntries(({TABLE_JS}).map((r) => [r.ts_code, r.price]))",
                                   expected, "the table's prices", timeout)

    async def wait_events(self, n: int, timeout: float = 10) -> list[str]:
        await self.page.wait_for(f"window.__tickwave.events.length >= {n}", f"{n} events received", timeout)
        return await self.event_ids()

    async def wait_breadth(self, expected: dict[str, dict[str, str]], timeout: float = 10) -> None:
        await self.page.wait_value(BREADTH_JS, expected, "the breadth bar's numbers", timeout)

    async def wait_candles(self, n: int, timeout: float = 10) -> dict[str, Any]:
        return await self.page.wait_for(
            f"window.__tickwave.kline && window.__tickwave.kline.candles.length >= {n} && window.__tickwave.kline",
            f"{n} candles drawn", timeout)


def shown_price(price: float) -> str:
    """A price as the page prints it (two decimals)."""
    return f"{price:.2f}"


def latest_prices(events: Sequence[PriceChange]) -> dict[str, str]:
    """ts_code -> the price the table must show after `events` (the newest per stock)."""
    out: dict[str, str] = {}
    for e in events:
        out[e.ts_code] = shown_price(e.price)
    return dict(sorted(out.items()))


async def stream_ids_after(log: EventLog, strategy: str, after_id: str) -> list[str]:
    """Every id in the strategy's stream after `after_id` (XRANGE, exclusive start)."""
    raw = await log.client.xrange(log.stream_key(strategy), min=f"({after_id}", max="+")
    return [i.decode() if isinstance(i, bytes) else i for i, _ in raw]


def breadth_row(board: str, event_id: str, **over: Any) -> dict[str, Any]:
    """One breadth ROW as contracts.md fixes it, with plausible defaults."""
    row: dict[str, Any] = dict(board=board, advancers=0, decliners=0, unchanged=0, limit_up=0, limit_down=0,
                               mean_change_percent=0.0, median_change_percent=0.0, amount=0.0, count=0,
                               timestamp="2026-11-24T10:00:03+08:00", event_id=event_id)
    row.update(over)
    return row


def kline_bar(ts_code: str, start: str, o: float, h: float, low: float, c: float, event_id: str,
              **over: Any) -> dict[str, Any]:
    """One 1-minute BAR as contracts.md fixes it (start as HH:MM on 2026-11-24, Beijing time)."""
    bar: dict[str, Any] = dict(ts_code=ts_code, interval="1m", start=f"2026-11-24T{start}:00+08:00",
                               end=f"2026-11-24T{start}:59+08:00", open=o, high=h, low=low, close=c,
                               volume=1000, amount=1000 * c, count=10, closed=True, event_id=event_id)
    bar.update(over)
    return bar
