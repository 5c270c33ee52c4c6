"""The `market` subscription and GET /api/market/breadth against real Redis: the old client's
subscribe frame, snapshot, live frames, and resume across reconnects."""

from __future__ import annotations

import asyncio
from datetime import date, datetime, timedelta

import aiohttp

from schemas.events import BREADTH_BOARDS, Breadth, BreadthRow
from schemas.market import SHANGHAI
from schemas.messages import MarketBreadth, MarketUpdate, Subscribed
from streams.events import EventLog
from tests.edge_harness import edge_settings, running_edge, ws_client

T0 = datetime(2026, 11, 24, 10, 0, tzinfo=SHANGHAI)


def breadth(n: int) -> Breadth:
    """The n-th computation: figures that differ from one to the next."""
    rows = [BreadthRow(board=b, advancers=n + i, decliners=i, unchanged=1, limit_up=n % 3, limit_down=0,
                       mean_change_percent=0.1 * i, median_change_percent=-0.05 * n, amount=1e6 * n + i,
                       count=n + 2 * i + 1) for i, b in enumerate(BREADTH_BOARDS)]
    when = T0 + timedelta(seconds=3 * n)
    return Breadth(trade_date=date(2026, 11, 24), time=when, computed_at=when, rows=rows)


async def append(log: EventLog, n: int) -> str:
    (eid,) = await log.append_events("market", [breadth(n)], sources=[("breadth", n)])
    return eid


def market_ids(frames: list[dict]) -> list[str]:
    return [f["event_id"] for f in frames if f["type"] == "market_update" and not f.get("snapshot")]


async def test_old_client_market_subscription_gets_the_latest_breadth_then_live_frames(redis_url, redis, keys):
    log = EventLog(redis, keys)
    for n in range(3):
        latest = await append(log, n)
    async with running_edge(edge_settings(redis_url, keys)) as base, ws_client(base) as c:
        await c.next()
        # the old client's frame, as it sends it
        await c.send('{"type":"subscribe","subscription_type":"market","target":"market"}')
        sub = Subscribed.model_validate(await c.next(type="subscribed"))
        assert (sub.subscription_type, sub.target, sub.event_id) == ("market", "market", latest)
        snap = await c.next(type="market_update")
        MarketUpdate.model_validate(snap)
        assert snap["snapshot"] is True and snap["event_id"] == latest and snap["epoch"] == sub.epoch
        assert [r["board"] for r in snap["data"]] == list(BREADTH_BOARDS)
        want = breadth(2).rows[0].model_dump()
        assert {k: snap["data"][0][k] for k in want} == want
        assert snap["data"][0]["timestamp"] == breadth(2).time.isoformat() and snap["data"][0]["event_id"] == latest
        live = [await append(log, n) for n in range(3, 6)]
        frames = [await c.next(type="market_update") for _ in live]
        for f in frames:
            MarketUpdate.model_validate(f)
        assert [f["event_id"] for f in frames] == live
        assert [f["data"][1]["advancers"] for f in frames] == [4, 5, 6]


async def test_a_market_subscriber_resumes_across_reconnects_with_no_gap_and_no_duplicate(redis_url, redis, keys):
    log = EventLog(redis, keys)
    written = [await append(log, 0)]
    stop = asyncio.Event()

    async def feed() -> None:
        n = 1
        while not stop.is_set():
            written.append(await append(log, n))
            n += 1
            await asyncio.sleep(0.01)

    feeder = asyncio.create_task(feed())
    seen: list[str] = []
    last = epoch = None
    try:
        async with running_edge(edge_settings(redis_url, keys)) as base:
            for _round in range(4):
                async with ws_client(base) as c:
                    await c.next()
                    msg = {"type": "subscribe", "subscription_type": "market", "target": "market"}
                    if last:
                        msg |= {"last_event_id": last, "epoch": epoch}
                    await c.send(msg)
                    sub = await c.next(type="subscribed")
                    assert sub["recovered"] is bool(last)
                    epoch = sub["epoch"]
                    while len(market_ids(c.frames)) < 20:
                        await c.next(type="market_update")
                    seen += market_ids(c.frames)
                    last = seen[-1]
                await asyncio.sleep(0.15)  # disconnected while breadth keeps coming
    finally:
        stop.set()
        await feeder
    start = written.index(seen[0])
    assert seen == written[start:start + len(seen)], "gap or duplicate across reconnects"


async def test_the_breadth_api_answers_404_before_the_first_and_then_the_latest(redis_url, redis, keys):
    log = EventLog(redis, keys)
    async with running_edge(edge_settings(redis_url, keys)) as base, aiohttp.ClientSession() as http:
        async with http.get(base + "/api/market/breadth") as r:
            assert r.status == 404 and "error" in await r.json()
        await append(log, 0)
        latest = await append(log, 1)
        async with http.get(base + "/api/market/breadth") as r:
            body = await r.json()
        assert r.status == 200
        MarketBreadth.model_validate(body)
        assert body["event_id"] == latest
        assert [row["amount"] for row in body["data"]] == [r.amount for r in breadth(1).rows]


async def test_breadth_both_replayed_and_read_live_is_sent_once(redis_url, redis, keys):
    """A node's group backlog is read live while the same entries are replayed to a resuming client."""
    log = EventLog(redis, keys)
    await append(log, 0)
    async with running_edge(edge_settings(redis_url, keys, edge_node="market-overlap")) as base:
        async with ws_client(base) as a:
            await a.next()
            await a.send({"type": "subscribe", "subscription_type": "market", "target": "market"})
            await a.next(type="market_update")
        await asyncio.sleep(0.1)  # the tail stopped; its group stays behind with a backlog to come
        backlog = [await append(log, n) for n in range(1, 121)]
        async with ws_client(base) as b:
            await b.next()
            first = await log.first_id("market")
            await b.send({"type": "subscribe", "subscription_type": "market", "target": "market",
                          "last_event_id": first})
            assert (await b.next(type="subscribed"))["replayed"] == 120
            live = [await append(log, n) for n in range(121, 124)]
            while live[-1] not in market_ids(b.frames):
                await b.next(type="market_update")
            await b.drain()  # anything sent twice would arrive by now
            assert market_ids(b.frames) == backlog + live


def test_a_breadth_batch_straddling_the_last_id_sent_gives_only_the_newer_frames():
    from edge.frames import batch_of
    from edge.subscription import outgoing
    from streams.codec import StoredEvent, parse_id

    stored = [StoredEvent(f"1000-{n}", breadth(n)) for n in range(4)]
    batch, bad = batch_of("market", "e1", stored)
    assert batch is not None and bad == 0
    frames = [f.text for f in outgoing(batch, after=parse_id("1000-1"))]
    assert [MarketUpdate.model_validate_json(t).event_id for t in frames] == ["1000-2", "1000-3"]


async def test_breadth_entries_are_archived_and_read_back_from_the_archive(redis, keys, pg_url):
    from streams.archive import ArchiveStore
    from streams.pg import create_pool, upgrade

    log = EventLog(redis, keys)
    ids = [await append(log, n) for n in range(3)]
    epoch = await log.epoch("market")
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    try:
        store = ArchiveStore(pool)
        assert await store.write("market", epoch, await log.read_after("market", None)) == 3
        back = await store.read_after("market", epoch, ids[0], limit=10)
        assert [s.id for s in back] == ids[1:]
        assert [s.event for s in back] == [breadth(1), breadth(2)]
    finally:
        await pool.close()
