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
from streams.connection import connect
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


async def test_a_bar_appended_between_the_live_tail_and_the_replay_is_sent_once(redis_url, redis, keys, monkeypatch):
    """The straddling case of a resume, built explicitly: a bar appended after the tail started
    and before the replay read it is both replayed and buffered live; it must go out once."""
    from edge import klines as edge_klines

    await declare(redis, keys, ["ticks"], partitions=4)
    log = BarLog(redis, keys, hold=False)
    await append(log, [bar(CODE, m) for m in range(3)])
    first = await stream_ids(redis, keys, CODE)
    buffered: list[str] = []
    deliver, history = edge_klines.KlineSub.deliver, edge_klines.bar_history

    def recording(self, bars):  # type: ignore[no-untyped-def]
        if self.buffering:
            buffered.extend(b.event_id for b in bars)
        return deliver(self, bars)

    async def straddling(*args, **kw):  # type: ignore[no-untyped-def]
        # the tail follows the stream now: append, and wait until the tail has buffered the bar
        await append(log, [bar(CODE, 3)])
        straddler = (await stream_ids(redis, keys, CODE))[-1]
        for _ in range(500):
            if straddler in buffered:
                break
            await asyncio.sleep(0.01)
        assert straddler in buffered, "the live tail never buffered the straddling bar"
        return await history(*args, **kw)

    monkeypatch.setattr(edge_klines.KlineSub, "deliver", recording)
    monkeypatch.setattr(edge_klines, "bar_history", straddling)
    async with running_edge(edge_settings(redis_url, keys)) as base, ws_client(base) as client:
        await client.next(type="connected")
        await client.send({"type": "subscribe", "subscription_type": "kline", "target": CODE,
                           "last_event_id": first[0], "epoch": await log.epoch(partition_for(CODE, 4))})
        resumed = await client.next(type="subscribed")
        assert resumed["recovered"] is True and resumed["replayed"] == 3
        await append(log, [bar(CODE, 4)])  # one live bar after the replay
        await client.next(type="kline_update")
        await client.drain(0.5)
    got = bar_ids(client.frames, CODE)
    assert got == (await stream_ids(redis, keys, CODE))[1:], f"received {got}"


async def test_kline_tails_count_against_the_nodes_max_tails(redis_url, redis, keys):
    from tests.factories import price_changes
    from streams.events import EventLog

    await declare(redis, keys, ["ticks"], partitions=4)
    await EventLog(redis, keys).append_events("s1", price_changes(1, "s1"))
    other = next(c for c in ("000001.SZ", "300750.SZ", "601318.SH", "000858.SZ")
                 if partition_for(c, 4) != partition_for(CODE, 4))
    async with running_edge(edge_settings(redis_url, keys, edge_max_tails=3)) as base, \
            ws_client(base) as a, ws_client(base) as b:
        await a.next(type="connected")
        await b.next(type="connected")
        # CODE: its bar stream and its partition's live stream, two tails
        await a.send({"type": "subscribe", "subscription_type": "kline", "target": CODE})
        await a.next(type="subscribed")
        await b.send({"type": "subscribe", "subscription_type": "kline", "target": CODE, "interval": "5m"})
        assert (await b.next(type="subscribed"))["interval"] == "5m"  # the same tails: no new one
        # another partition's stock needs two more: refused, the connection stays
        await b.send({"type": "subscribe", "subscription_type": "kline", "target": other, "id": 7})
        err = await b.next(type="error")
        assert (err["code"], err["id"]) == ("node_full", 7)
        await b.send({"type": "subscribe", "target": "s1"})  # one tail left: a strategy fits
        assert (await b.next(type="subscribed"))["target"] == "s1"
        await b.send({"type": "subscribe", "subscription_type": "stock", "target": other, "id": 8})
        err = await b.next(type="error")  # a stock tail would be the fourth
        assert (err["code"], err["id"]) == ("node_full", 8)
        await b.send({"type": "ping"})
        assert (await b.next(type="pong"))["type"] == "pong"
        for client in (a, b):
            await client.send({"type": "unsubscribe", "subscription_type": "kline", "target": CODE,
                               "interval": "1m" if client is a else "5m"})
            await client.next(type="unsubscribed")
        await b.send({"type": "subscribe", "subscription_type": "kline", "target": other})
        assert (await b.next(type="subscribed"))["target"] == other


async def test_a_kline_subscribe_while_redis_is_down_gets_unavailable_and_works_once_it_is_back(keys):
    from tickwave import servers

    own = servers.start_redis()
    try:
        client = connect(own.url)
        await declare(client, keys, ["ticks"], partitions=4)
        await append(BarLog(client, keys, hold=False), [bar(CODE, 0)])
        await client.aclose()
        async with running_edge(edge_settings(own.url, keys)) as base, ws_client(base) as c:
            await c.next(type="connected")
            await c.send({"type": "subscribe", "subscription_type": "kline", "target": CODE})
            await c.next(type="subscribed")
            await c.next(type="kline_update")
            own.stop()
            await c.send({"type": "subscribe", "subscription_type": "kline", "target": OTHER, "id": 3})
            err = await c.next(type="error", timeout=15)
            assert (err["code"], err["id"]) == ("unavailable", 3)
            await c.send({"type": "ping", "id": 4})
            assert (await c.next(type="pong"))["id"] == 4
            own = servers.EmbeddedRedis(own.binary, port=own.port).start()
            back = connect(own.url)
            await declare(back, keys, ["ticks"], partitions=4)
            await append(BarLog(back, keys, hold=False), [bar(OTHER, 0)])
            await back.aclose()
            await c.send({"type": "subscribe", "subscription_type": "kline", "target": OTHER, "id": 5})
            ok = await c.next(type="subscribed", timeout=15)
            assert (ok["target"], ok["id"]) == (OTHER, 5)
            snap = await c.next(type="kline_update")
            assert [b["start"] for b in snap["data"]] == [bar(OTHER, 0).start.isoformat()]
    finally:
        own.stop()
