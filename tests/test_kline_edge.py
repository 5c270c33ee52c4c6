"""The edge's `kline` subscription and the kline HTTP API, on bars appended through the bar
append script (the agent's own path), real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import timedelta

import aiohttp

from agents.archiver import BarArchiver
from schemas.klines import Bar, derive
from streams.klines import BarArchive, BarLog
from streams.partition import partition_for
from streams.pg import create_pool, upgrade
from streams.topics import declare
from tests.edge_harness import edge_settings, running_edge, ws_client
from tests.kline_harness import DAY

CODE, OTHER = "600519.SH", "000001.SZ"


def bar(code: str, minute: int) -> Bar:
    start = DAY.replace(hour=9, minute=30) + timedelta(minutes=minute)
    price = 10 + minute / 100
    return Bar(ts_code=code, start=start, end=start + timedelta(minutes=1), open=price, high=price + 0.05,
               low=price - 0.05, close=price + 0.01, volume=100 * (minute + 1), amount=1000.0 * (minute + 1), count=3)


async def append(log: BarLog, bars: list[Bar]) -> None:
    for b in bars:
        await log.append(partition_for(b.ts_code, 4), [b])


async def stream_ids(redis, keys, code: str) -> list[str]:
    return [eid.decode() for eid, _ in await redis.xrange(keys.kline(partition_for(code, 4), code))]


def bar_ids(frames: list[dict], code: str) -> list[str]:
    return [row["event_id"] for f in frames if f["type"] == "kline_update" and f["target"] == code for row in f["data"]]


async def test_a_kline_subscriber_that_reconnects_resumes_with_no_gap_and_no_duplicate(redis_url, redis, keys):
    await declare(redis, keys, ["ticks"], partitions=4)
    log = BarLog(redis, keys, hold=False)
    await append(log, [bar(CODE, m) for m in range(5)] + [bar(OTHER, m) for m in range(5)])
    minute = 5
    stop = asyncio.Event()

    async def writer() -> None:
        nonlocal minute
        while not stop.is_set() and minute < 400:
            await append(log, [bar(CODE, minute), bar(OTHER, minute)])
            minute += 1
            await asyncio.sleep(0.002)

    async with running_edge(edge_settings(redis_url, keys)) as base:
        async with ws_client(base) as first:
            await first.next(type="connected")
            await first.send({"type": "subscribe", "subscription_type": "kline", "target": CODE})
            subscribed = await first.next(type="subscribed")
            assert (subscribed["subscription_type"], subscribed["interval"]) == ("kline", "1m")
            snapshot = await first.next(type="kline_update")
            assert snapshot["snapshot"] is True and len(snapshot["data"]) == 5
            task = asyncio.create_task(writer())
            await first.next(type="kline_update", timeout=5)
            await first.next(type="kline_update", timeout=5)
        seen = bar_ids(first.frames, CODE)
        await asyncio.sleep(0.2)  # bars appended while the client is away
        assert minute < 400, "the writer finished before the disconnect"  # bars are written while away
        async with ws_client(base) as second:
            await second.next(type="connected")
            await second.send({"type": "subscribe", "subscription_type": "kline", "target": CODE,
                               "last_event_id": seen[-1], "epoch": subscribed["epoch"]})
            resumed = await second.next(type="subscribed")
            assert resumed["recovered"] is True and resumed["replayed"] > 0
            await task
            await second.drain(0.5)
        got = seen + bar_ids(second.frames, CODE)
    expected = await stream_ids(redis, keys, CODE)
    assert len(got) == len(set(got)), "a bar was sent twice"
    assert got == expected, f"{len(got)} bars received, the stream holds {len(expected)}"
    assert all(row["ts_code"] == CODE for f in second.frames if f["type"] == "kline_update" for row in f["data"])


async def test_a_derived_interval_continues_the_open_bar_of_its_snapshot_live(redis_url, redis, keys):
    await declare(redis, keys, ["ticks"], partitions=4)
    log = BarLog(redis, keys, hold=False)
    await append(log, [bar(CODE, m) for m in range(7)])  # 09:30..09:36: one closed 5m bar, one open
    async with running_edge(edge_settings(redis_url, keys)) as base, ws_client(base) as client:
        await client.next(type="connected")
        await client.send({"type": "subscribe", "subscription_type": "kline", "target": CODE, "interval": "5m"})
        sub = await client.next(type="subscribed")
        snap = await client.next(type="kline_update")
        assert [(b["start"][11:16], b["closed"], b["count"]) for b in snap["data"]] == [("09:30", True, 15),
                                                                                       ("09:35", False, 6)]
        await append(log, [bar(CODE, 7), bar(CODE, 8), bar(CODE, 9)])
        live = await client.next(type="kline_update")
        while not live["data"][-1]["closed"]:  # the three minutes may come in one frame or several
            live = await client.next(type="kline_update")
        assert live["data"][-1]["closed"] is True and live["data"][-1]["count"] == 15
        all_bars = [b for b in await log.read(log.stream_key(CODE, 4))]
        assert live["data"][-1] == derive(all_bars, "5m")[-1].model_dump(mode="json")
        assert sub["interval"] == "5m"


async def test_bad_interval_or_ts_code_gets_an_error_frame_and_the_connection_stays_open(redis_url, redis, keys):
    await declare(redis, keys, ["ticks"], partitions=4)
    async with running_edge(edge_settings(redis_url, keys)) as base, ws_client(base) as client:
        await client.next(type="connected")
        await client.send({"type": "subscribe", "subscription_type": "kline", "target": CODE, "interval": "2m",
                           "id": 1})
        err = await client.next(type="error")
        assert err["code"] == "bad_message" and err["id"] == 1
        assert err["details"][0]["field"] == "interval"
        await client.send({"type": "subscribe", "subscription_type": "kline", "target": "999999.XX", "id": 2})
        err = await client.next(type="error")
        assert (err["code"], err["id"], err["details"]) == ("bad_message", 2, {"field": "target"})
        await client.send({"type": "ping", "id": 3})
        assert (await client.next(type="pong"))["id"] == 3


async def test_the_kline_api_reads_redis_then_the_archive_as_json_and_csv(redis_url, redis, keys, pg_url):
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    try:
        await declare(redis, keys, ["ticks"], partitions=4)
        log = BarLog(redis, keys, maxlen=5, hold=True)
        archiver = BarArchiver(redis, keys, BarArchive(pool))
        written = []
        for m in range(20):
            written.append(bar(CODE, m))
            await append(log, [bar(CODE, m)])
            if m % 4 == 3:
                assert await archiver.round() > 0
        await archiver.round()
        await append(log, [bar(CODE, 20)])  # trims what the archive now holds
        written.append(bar(CODE, 20))
        assert len(await stream_ids(redis, keys, CODE)) <= 6, "retention did not trim"
        async with running_edge(edge_settings(redis_url, keys, database_url=pg_url)) as base, \
                aiohttp.ClientSession() as http:
            async with http.get(f"{base}/api/stocks/{CODE}/kline") as resp:
                body = await resp.json()
            assert body["covered"] is True and body["interval"] == "1m"
            assert [(b["start"], b["close"], b["volume"]) for b in body["bars"]] == [
                (b.start.isoformat(), b.close, b.volume) for b in written]
            async with http.get(f"{base}/api/stocks/{CODE}/kline",
                                params={"interval": "15m", "format": "csv", "since": "2026-11-24T09:40"}) as resp:
                rows = list(csv.DictReader(io.StringIO(await resp.text())))
            # 09:40..09:50 of 1-minute bars: 09:40-09:44 of the 09:30 bar (closed), 09:45-09:50 (open)
            assert [(r["start"][11:16], r["count"], r["closed"]) for r in rows] == [
                ("09:30", "15", "True"), ("09:45", "18", "False")]
            async with http.get(f"{base}/api/stocks/{CODE}/kline", params={"interval": "2m"}) as resp:
                assert resp.status == 400 and "interval" in (await resp.json())["error"]
            async with http.get(f"{base}/api/stocks/XYZ/kline") as resp:
                assert resp.status == 400
    finally:
        await pool.close()
