"""K-line bars from worker to subscriber: ticks into the ticks topic, a real `tickwave worker`,
a real `tickwave edge` process, `kline` subscribers on WebSocket; bars checked against a
brute-force computation from the same ticks (tests/kline_harness.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from schemas.events import Tick
from tests.driver_harness import wait_until
from tests.edge_harness import Client
from tests.join_harness import REPO, JoinWorker, send_ticks, topics
from tests.kline_harness import DAY, BarKey, brute_force_bars, day_ticks
from streams.partition import partition_for
from tickwave.servers import free_port

CODES = ["600519.SH", "000001.SZ", "300750.SZ", "688981.SH", "601318.SH", "000858.SZ"]
WATCHED = CODES[:3]


@asynccontextmanager
async def edge_process(redis_url: str, keys: Any, workdir: Path) -> AsyncIterator[str]:
    """`tickwave edge` in its own process; yields its WebSocket URL once it answers /healthz."""
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "TICKWAVE_KEY_PREFIX": keys.prefix, "TICKWAVE_EDGE_PORT": str(port),
           "TICKWAVE_EDGE_HOST": "127.0.0.1", "TICKWAVE_EDGE_NODE": f"kl-{port}"}
    env.pop("DATABASE_URL", None)
    with open(workdir / "edge.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tickwave", "edge"], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, (workdir / "edge.log").read_text()[-3000:]
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, "the edge never answered /healthz"
                await asyncio.sleep(0.1)
        yield f"http://127.0.0.1:{port}/ws"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@asynccontextmanager
async def subscribed(url: str, code: str, interval: str = "1m") -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        client = Client(ws)
        await client.next(type="connected")
        await client.send({"type": "subscribe", "subscription_type": "kline", "target": code, "interval": interval})
        assert (await client.next(type="subscribed"))["interval"] == interval
        assert (await client.next(type="kline_update"))["snapshot"] is True
        yield client


def key_of(row: dict[str, Any]) -> BarKey:
    return (row["ts_code"], row["start"], row["end"], row["open"], row["high"], row["low"], row["close"],
            row["volume"], row["amount"], row["count"], row["closed"])


def closed_bars(client: Client) -> list[BarKey]:
    return [key_of(r) for f in client.frames if f["type"] == "kline_update" and not f.get("snapshot")
            for r in f["data"] if r["closed"]]


def partial_bars(client: Client) -> list[tuple[float, BarKey]]:
    return [(f["_at"], key_of(r)) for f in client.frames if f["type"] == "kline_update" and not f.get("snapshot")
            for r in f["data"] if not r["closed"]]


async def reading(client: Client, stop: asyncio.Event) -> None:
    """Read frames into client.frames (each stamped with its arrival) until `stop`."""
    while not stop.is_set():
        try:
            msg = await client.ws.receive(timeout=0.2)
        except asyncio.TimeoutError:
            continue
        if msg.type != aiohttp.WSMsgType.TEXT:
            return
        doc = msg.json()
        doc["_at"] = time.monotonic()
        client.frames.append(doc)


@pytest.mark.timeout(240)
async def test_kline_subscribers_receive_exactly_the_bars_a_brute_force_computation_gives(
        redis_url, redis, keys, tmp_path: Path):
    await topics(redis, keys)
    steps = day_ticks(CODES)
    expected = brute_force_bars([t for s in steps for t in s])
    worker = JoinWorker(redis_url, keys, tmp_path, "w").start()
    stop = asyncio.Event()
    try:
        async with edge_process(redis_url, keys, tmp_path) as url, \
                subscribed(url, WATCHED[0]) as a, subscribed(url, WATCHED[1]) as b, subscribed(url, WATCHED[2]) as c:
            clients = dict(zip(WATCHED, (a, b, c)))
            readers = [asyncio.create_task(reading(x, stop)) for x in clients.values()]
            for step in steps:
                await send_ticks(redis, keys, step)
            owed = {code: [k for k in expected if k[0] == code] for code in WATCHED}

            async def all_in() -> bool:
                return all(len(closed_bars(clients[code])) >= len(owed[code]) for code in WATCHED)

            await wait_until(all_in, 150, "the subscribers never received every bar owed", [worker])
            await asyncio.sleep(1.5)  # a bar sent twice would show now
            stop.set()
            await asyncio.gather(*readers)
        for code in WATCHED:
            got = closed_bars(clients[code])
            assert got == owed[code], (f"{code}: {len(got)} closed bars received, {len(owed[code])} owed; first "
                                       f"difference {next(((g, o) for g, o in zip(got, owed[code]) if g != o), None)}")
            assert not [k for k, n in Counter(got).items() if n > 1]
            assert any("T11:29" in k[1] for k in got) and any("T13:00" in k[1] for k in got)
    finally:
        stop.set()
        assert worker.stop() == 0, worker.log()[-3000:]


def prefix_bars(ticks: list[Tick]) -> set[BarKey]:
    """The open bar after each prefix of one minute's ticks, as brute force computes it (closed
    left out: a bar's own figures do not depend on whether it closed)."""
    return {brute_force_bars(ticks[:n])[-1][:-1] + (False,) for n in range(1, len(ticks) + 1)}


@pytest.mark.timeout(180)
async def test_the_open_bar_is_pushed_live_at_most_once_per_interval_and_the_closed_bar_exactly_once(
        redis_url, redis, keys, tmp_path: Path):
    await topics(redis, keys)
    live_s = 0.5
    code = WATCHED[0]
    start = DAY.replace(hour=10, minute=0)
    ticks = [Tick(ts_code=code, time=start + timedelta(milliseconds=200 * i), price=round(10 + (i * 37 % 23) / 100, 2),
                  pre_close=10.0, volume=100 * (i + 1) * (i + 2) // 2, amount=round(1000.0 * (i + 1), 2),
                  source="test") for i in range(40)]
    worker = JoinWorker(redis_url, keys, tmp_path, "w", TICKWAVE_KLINE_LIVE_S=str(live_s)).start()
    stop = asyncio.Event()
    try:
        async with edge_process(redis_url, keys, tmp_path) as url, subscribed(url, code) as client, \
                subscribed(url, code, "5m") as five:
            readers = [asyncio.create_task(reading(x, stop)) for x in (client, five)]
            await worker_live(redis, keys, worker)  # else a late start takes all the ticks in one batch
            began = time.monotonic()
            for t in ticks:  # 40 ticks in about 2 s: 20 a second
                await send_ticks(redis, keys, [t])
                await asyncio.sleep(0.05)
            fed_s = time.monotonic() - began

            async def caught_up() -> bool:  # the open bar with every tick in it reached the client
                return any(k[9] == len(ticks) for _, k in partial_bars(client))

            await wait_until(caught_up, 30, "the open bar with all 40 ticks never came live", [worker])
            partials = partial_bars(client)
            owed = prefix_bars(ticks)
            assert {k for _, k in partials} <= owed, f"partial bars no prefix of the ticks gives: " \
                                                     f"{[k for _, k in partials if k not in owed][:2]}"
            assert partials[-1][1] == brute_force_bars(ticks)[0][:-1] + (False,)
            # throttled: not one per tick, at most one per live_s (one more for the wait after)
            assert 1 < len(partials) <= fed_s / live_s + 3, f"{len(partials)} partial bars in {fed_s:.1f} s"
            # the 5m subscriber gets the derived open bar: its one minute so far
            five_partials = partial_bars(five)
            assert five_partials and five_partials[-1][1][1:3] == (start.isoformat(),
                                                                    (start + timedelta(minutes=5)).isoformat())
            assert five_partials[-1][1][3:10] == partials[-1][1][3:10]
            # a tick of the next minute closes the bar: sent once, equal to the brute force
            await send_ticks(redis, keys, [ticks[-1].model_copy(update={"time": start + timedelta(minutes=1, seconds=1),
                                                                         "volume": ticks[-1].volume + 100})])
            await wait_until(lambda: _has_closed(client), 20, "the closed bar never came", [worker])
            await asyncio.sleep(2 * live_s + 0.5)  # the next minute's open bar goes live; a stale one would too
            stop.set()
            await asyncio.gather(*readers)
        assert closed_bars(client) == [brute_force_bars(ticks)[0]]
        closed_at = next(i for i, f in enumerate(client.frames) if f["type"] == "kline_update"
                         and any(r["closed"] for r in f["data"]))
        after = [r for f in client.frames[closed_at + 1:] if f["type"] == "kline_update" for r in f["data"]]
        assert after and all(r["start"] > start.isoformat() and not r["closed"] for r in after), \
            f"after the closed bar: {[(r['start'], r['closed']) for r in after]}"
        frame = client.frames[closed_at]
        later = [f for f in client.frames[closed_at + 1:] if f["type"] == "kline_update"]
        assert all(f["event_id"] == frame["event_id"] for f in later), "a partial bar's frame moved the resume id"
    finally:
        stop.set()
        assert worker.stop() == 0, worker.log()[-3000:]


async def worker_live(redis: Any, keys: Any, worker: JoinWorker) -> None:
    """Until the worker makes bars: a bar of another stock, closed by that stock's next tick."""
    other = CODES[-1]
    early = DAY.replace(hour=9, minute=58)
    await send_ticks(redis, keys, [Tick(ts_code=other, time=early + timedelta(minutes=m), price=10.0, pre_close=10.0,
                                        volume=100 * (m + 1), amount=1000.0 * (m + 1), source="test")
                                   for m in range(2)])
    stream = keys.kline(partition_for(other, 4), other)

    async def made() -> bool:
        return bool(await redis.xlen(stream))

    await wait_until(made, 60, "the worker never made a bar", [worker])


async def _has_closed(client: Client) -> bool:
    return bool(closed_bars(client))
