"""The live page in headless Chromium, against a real edge and Redis, through a network the test can cut."""

from __future__ import annotations

import pytest

from streams.events import EventLog
from tests.browser_harness import Chromium, ensure_chromium
from tests.edge_harness import edge_settings, running_edge
from tests.factories import price_change, price_changes
from tests.test_edge_market import append as append_breadth
from tests.test_edge_market import breadth
from tests.live_page_harness import (
    LivePage,
    breadth_row,
    kline_bar,
    latest_prices,
    shown_price,
    stream_ids_after,
)
from tests.tcp_proxy import TcpProxy

S = "volume_wave"
# room for the first test to install chromium when a developer's machine lacks it (CI installs it first)
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="session")
def chromium_binary() -> str:
    return ensure_chromium()


@pytest.fixture
async def proxy(redis_url, keys, redis):
    """The edge, reached only through a TCP proxy (HTTP and WebSocket alike): the network to cut."""
    settings = edge_settings(redis_url, keys, edge_heartbeat_s=2.0)
    async with running_edge(settings):
        proxy = await TcpProxy(settings.edge_port).start()
        try:
            yield proxy
        finally:
            await proxy.close()


@pytest.fixture
async def live(chromium_binary, proxy):
    browser = await Chromium(chromium_binary).start()
    try:
        page = await browser.page()
        try:
            yield LivePage(page, proxy.url)
            assert page.js_errors() == [], "the page raised or logged JS errors"
        finally:
            await page.close()
    finally:
        browser.stop()


class Appender:
    """Appends price changes to one strategy at fresh tick offsets, remembering what it wrote."""

    def __init__(self, log: EventLog, strategy: str = S):
        self.log, self.strategy, self.offset = log, strategy, 0
        self.events: list = []

    async def __call__(self, n: int) -> list[str]:
        batch = price_changes(n, self.strategy, start=self.offset)
        self.offset += n
        self.events += batch
        return await self.log.append_events(self.strategy, batch)

    async def one(self, event) -> str:
        self.events.append(event)
        return (await self.log.append_events(self.strategy, [event]))[0]


async def drop_network(proxy: TcpProxy) -> None:
    """Resets every open connection and refuses new ones: the page's socket really dies."""
    proxy.refusing = True
    assert proxy.cut() >= 1, "the page had no connection open through the proxy to cut"


async def test_prices_arrive_and_a_network_drop_resumes_with_no_gap_and_no_duplicate(live, proxy, redis, keys):
    log = EventLog(redis, keys)
    feed = Appender(log)
    await feed(6)  # before the page opens: it starts from the snapshot
    await Appender(log, "breakout")(3)
    await live.open()
    await live.page.wait_for("document.querySelectorAll('#strategy option').length === 2", "the picker filled")
    assert await live.options() == ["breakout", S]  # from /api/strategies, sorted
    await live.wait_state("live")

    # picked from the picker, remembered in the URL
    await live.page.select("#strategy", S)
    await live.page.wait_for(f"location.hash === '#strategy={S}'", "the choice in the URL hash")
    await live.wait_resume("snapshot")
    await live.wait_prices(latest_prices(feed.events))
    subscribed = [f for f in await live.subscribed() if f["target"] == S]
    assert len(subscribed) == 1 and subscribed[0]["event_id"] == await log.latest_id(S)
    start_id = subscribed[0]["event_id"]

    live_ids = await feed(5)
    assert await live.wait_events(5) == live_ids
    await live.wait_prices(latest_prices(feed.events))

    await drop_network(proxy)
    await live.wait_state("reconnecting (attempt 2)")  # a refused reconnect backs off and tries again
    down_ids = await feed(7)
    assert await live.event_ids() == live_ids, "events arrived while the network was down"
    proxy.refusing = False
    await live.wait_resume("resumed with 7 replayed")
    await live.wait_state("live")

    after = await feed(3)
    # a fall below the previous close (on another tick partition, so no offset collides)
    after.append(await feed.one(price_change(S, "000001.SZ", 10.9, partition=1, offset=0, pre_close=11.2)))
    await live.wait_prices(latest_prices(feed.events))
    received = await live.wait_events(15)
    stream = await stream_ids_after(log, S, start_id)
    assert received == stream == live_ids + down_ids + after
    assert len(set(received)) == len(received)
    table = await live.table()
    # red up, green down: the price's colour and the row's flash
    assert table["000001.SZ"]["price_class"] == "down" and table["000001.SZ"]["flash"] == "down"
    assert table["600519.SH"]["price_class"] == "up"

    # reloaded, the page opens on the strategy the URL remembers
    await live.open(f"#strategy={S}")
    await live.wait_resume("snapshot")
    assert await live.page.evaluate("document.getElementById('strategy').value") == S


async def test_a_stream_recreated_while_down_gives_a_snapshot_after_a_lost_resume(live, proxy, redis, keys):
    log = EventLog(redis, keys)
    feed = Appender(log)
    await feed(4)
    await live.open(f"#strategy={S}")
    await live.wait_resume("snapshot")
    first = await feed(3)
    assert await live.wait_events(3) == first
    old_epoch = await log.epoch(S)

    await drop_network(proxy)
    await live.wait_state("reconnecting")
    # the stream is recreated while the page is away: a new epoch, its old ids mean nothing
    await redis.delete(keys.events(S), keys.epoch(S), keys.snapshot(S), keys.positions(S))
    reborn = Appender(log)
    reborn.offset = 50_000
    await reborn(5)
    assert await log.epoch(S) != old_epoch
    proxy.refusing = False

    await live.wait_resume("snapshot after a lost resume")
    await live.wait_state("live")
    await live.wait_prices(latest_prices(reborn.events))
    last = (await live.subscribed())[-1]
    assert last["recovered"] is False and last["epoch"] == await log.epoch(S)
    assert last["event_id"] == await log.latest_id(S)

    later = await reborn(4)
    received = await live.wait_events(7)
    assert received == first + later  # nothing from the snapshot counted, nothing missing after it
    assert later == await stream_ids_after(log, S, last["event_id"])
    await live.wait_prices(latest_prices(reborn.events))


async def test_a_silent_network_is_noticed_by_the_heartbeat_and_resumed(live, proxy, redis, keys):
    log = EventLog(redis, keys)
    feed = Appender(log)
    await feed(3)
    await live.open(f"#strategy={S}")
    await live.wait_resume("snapshot")
    # the page pings a third of the heartbeat (2 s here) apart and hears pongs
    await live.page.wait_for("window.__tickwave.pongs >= 2", "two pongs", timeout=5)
    assert proxy.freeze() >= 1  # bytes stop, no socket closes: only the missing pongs tell
    down = await feed(4)
    await live.wait_state("reconnecting", timeout=15)
    await live.wait_resume("resumed with 4 replayed", timeout=15)
    assert await live.event_ids() == down


async def test_a_strategy_without_events_waits_and_goes_live_with_its_first(live, redis, keys):
    await live.open("#strategy=fresh_one")
    await live.wait_state("no such strategy")
    assert "fresh_one" in await live.options()
    log = EventLog(redis, keys)
    ids = await Appender(log, "fresh_one")(2)
    await live.wait_state("live", timeout=12)  # asks again every 5 s
    await live.wait_prices(latest_prices(price_changes(2, "fresh_one")))
    assert (await live.subscribed())[-1]["event_id"] == ids[-1]


async def test_server_text_is_shown_as_text_never_run(live, redis, keys):
    log = EventLog(redis, keys)
    evil = '<img src=x onerror="window.__xss=1"><b>贵州茅台</b>'
    event = price_change(S, "600519.SH", 1510.0)
    event = event.model_copy(update={"name": evil})
    await log.append_events(S, [event])
    await live.open(f"#strategy={S}")
    await live.wait_prices({"600519.SH": shown_price(1510.0)})
    assert (await live.table())["600519.SH"]["name"] == evil
    assert await live.page.evaluate("document.querySelectorAll('#rows img, #rows b').length") == 0
    assert await live.page.evaluate("window.__xss === undefined")

    # a hand-made URL: the name is refused by the edge and shown as text
    await live.open('#strategy=<img src=x onerror="window.__xss=2">')
    await live.wait_state("refused")
    assert "strategy" in await live.resume()
    assert await live.page.evaluate("document.querySelectorAll('img').length") == 0
    assert await live.page.evaluate("window.__xss === undefined")


async def test_without_breadth_or_klines_the_page_degrades_quietly(live, redis, keys):
    log = EventLog(redis, keys)
    await Appender(log)(3)
    await live.open(f"#strategy={S}")
    await live.wait_resume("snapshot")
    # nothing wrote breadth: the market subscription is refused and the bar stays hidden
    await live.page.wait_for("window.__tickwave.errors.some((e) => e.id === 'market')", "the market refusal")
    assert [e["code"] for e in await live.errors() if e["id"] == "market"] == ["unknown_strategy"]
    assert await live.breadth_hidden()
    # a clicked stock with no bars (nothing made K-lines here): a quiet note, no chart; the edge
    # serves the kline API and subscription, so the page follows the stock for bars to come
    await live.page.click('#rows tr[data-code="600519.SH"]')
    await live.page.wait_text("#kline-note", "no bars yet today")
    await live.page.wait_for("window.__tickwave.kline && window.__tickwave.kline.status === 'live'",
                             "the empty kline snapshot")
    kline = await live.kline()
    assert kline["ts_code"] == "600519.SH" and kline["candles"] == []
    assert await live.state() == "live"


async def test_breadth_and_kline_frames_of_the_contract_are_drawn(live, redis, keys):
    """The page against contracts.md's frames, handed to its frame handler: the renderers'
    check until the breadth and kline writers land (then drive them end to end instead)."""
    log = EventLog(redis, keys)
    await Appender(log)(3)
    await live.open(f"#strategy={S}")
    await live.wait_resume("snapshot")
    await live.feed({"type": "market_update", "target": "market", "epoch": "e1", "event_id": "5-0", "snapshot": True,
                     "data": [breadth_row("all", "5-0", advancers=3000, decliners=2000, unchanged=400, limit_up=51,
                                          limit_down=7, mean_change_percent=0.42),
                              breadth_row("chinext", "5-0", advancers=700, decliners=600, unchanged=30,
                                          limit_up=9, limit_down=1, mean_change_percent=-0.31),
                              breadth_row("<i>x</i>", "5-0", advancers=1)]})
    await live.feed({"type": "market_update", "target": "market", "epoch": "e1", "event_id": "6-0",
                     "data": [breadth_row("chinext", "6-0", advancers=710, decliners=590, unchanged=30,
                                          limit_up=10, limit_down=1, mean_change_percent=-0.25)]})
    nums = lambda a, d, u, lu, ld, m: {"advancers": f"↑{a}", "decliners": f"↓{d}", "unchanged": f"–{u}",  # noqa: E731
                                       "limit_up": f"涨停 {lu}", "limit_down": f"跌停 {ld}", "mean_change_percent": f"{m}%"}
    await live.wait_breadth({"all": nums(3000, 2000, 400, 51, 7, "0.42"), "chinext": nums(710, 590, 30, 10, 1, "-0.25"),
                             "<i>x</i>": nums(1, 0, 0, 0, 0, "0.00")})
    assert not await live.breadth_hidden()
    assert await live.page.evaluate("document.querySelectorAll('#breadth i').length") == 0

    await live.page.click('#rows tr[data-code="600519.SH"]')
    await live.page.wait_for("window.__tickwave.kline && window.__tickwave.kline.status !== 'loading'", "the API answer")
    bars = [kline_bar("600519.SH", "09:30", 1500, 1512, 1498, 1510, "7-0"),   # up: red
            kline_bar("600519.SH", "09:31", 1510, 1511, 1490, 1495, "8-0"),   # down: green
            kline_bar("600519.SH", "09:32", 1495, 1496, 1494, 1495, "9-0")]   # flat
    await live.feed({"type": "kline_update", "target": "600519.SH", "interval": "1m", "epoch": "k1",
                     "event_id": "9-0", "snapshot": True, "data": bars})
    # a live partial bar replaces the bar of the same minute
    await live.feed({"type": "kline_update", "target": "600519.SH", "interval": "1m", "epoch": "k1", "event_id": "10-0",
                     "data": [kline_bar("600519.SH", "09:32", 1495, 1520, 1494, 1519, "10-0", closed=False)]})
    kline = await live.wait_candles(3)
    assert [c["color"] for c in kline["candles"]] == ["up", "down", "up"]
    assert [b["close"] for b in kline["bars"]] == [1510, 1495, 1519]
    # the canvas really has them: each candle body's middle pixel, red up and green down
    pixels = await live.page.evaluate("""window.__tickwave.kline.candles.map(({x, y}) =>
      [...document.getElementById('kline-canvas').getContext('2d').getImageData(x, y, 1, 1).data.slice(0, 3)])""")
    assert pixels == [[0xd0, 0x02, 0x1b], [0x1a, 0x7f, 0x37], [0xd0, 0x02, 0x1b]]


async def test_breadth_written_to_the_market_stream_reaches_the_bar_and_moves_live(live, redis, keys):
    """End to end through the real writer path (append_events with the breadth kind, as the
    breadth agent writes): the page's market subscription gets the snapshot, then live entries."""
    log = EventLog(redis, keys)
    await Appender(log)(3)
    await append_breadth(log, 1)
    await live.open(f"#strategy={S}")
    await live.wait_resume("snapshot")

    def shown(n: int) -> dict[str, dict[str, str]]:
        rows = {r.board: r for r in breadth(n).rows}
        return {b: {"advancers": f"↑{r.advancers}", "decliners": f"↓{r.decliners}", "unchanged": f"–{r.unchanged}",
                    "limit_up": f"涨停 {r.limit_up}", "limit_down": f"跌停 {r.limit_down}",
                    "mean_change_percent": f"{r.mean_change_percent:.2f}%"} for b, r in rows.items()}

    await live.wait_breadth(shown(1))
    assert not await live.breadth_hidden()
    await append_breadth(log, 2)
    await live.wait_breadth(shown(2))
