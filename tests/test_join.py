"""The join, end to end: real `tickwave worker` processes on the Redis Streams driver, real
Redis and PostgreSQL, events checked against an independent computation from ticks and signals."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from agents.archiver import Archiver
from schemas.events import SignalChange
from streams.archive import ArchiveStore
from streams.codec import encode_record
from streams.keys import Keys
from streams.log import PartitionLog
from streams.partition import partition_for
from streams.pg import create_pool, upgrade
from tests.driver_harness import wait_until
from tests.edge_harness import edge_settings, running_edge, ws_client
from tests.join_harness import (
    JoinWorker,
    expected_events,
    make_signal,
    send_signal,
    send_ticks,
    stream_events,
    tick,
    topics,
)
from tickwave.servers import free_port

STRATEGIES = ("volume_wave", "breakout", "dragon")


async def total_events(redis, keys: Keys, strategies=STRATEGIES) -> int:
    return sum([await redis.xlen(keys.events(s)) for s in strategies])


async def test_signals_turn_ticks_into_events_and_reach_subscribers_as_signal_updates(redis_url, redis, keys,
                                                                                        tmp_path: Path):
    await topics(redis, keys)
    worker = JoinWorker(redis_url, keys, tmp_path, "w").start()
    try:
        await send_signal(redis, keys, SignalChange(action="add", signal=make_signal("volume_wave", "600519.SH", 10.0)), 1)
        await wait_until(lambda: _exists(redis, keys.events("volume_wave")), 60,
                         "the first signal change never reached the strategy's stream", [worker])
        async with running_edge(edge_settings(redis_url, keys)) as base, ws_client(base) as client:
            await client.next(type="connected")
            await client.send({"type": "subscribe", "target": "volume_wave"})
            await client.next(type="subscribed")
            # a second stock's signal arrives live, as the old client's signal_update
            await send_signal(redis, keys, SignalChange(action="add", signal=make_signal("volume_wave", "000001.SZ", 10.0)), 2)
            added = await client.next(type="signal_update", timeout=10)
            assert (added["action"], added["data"][0]["ts_code"]) == ("add", "000001.SZ")
            # its next tick becomes a price event
            await send_ticks(redis, keys, [tick("000001.SZ", 1)])
            update = await client.next(type="price_update", timeout=10)
            assert [row["ts_code"] for row in update["data"]] == ["000001.SZ"]
            assert update["data"][0]["price"] == tick("000001.SZ", 1).price
            # removed: a signal_update, and its ticks stop producing events
            await send_signal(redis, keys, SignalChange(action="remove", signal=make_signal("volume_wave", "000001.SZ", 10.0)), 3)
            removed = await client.next(type="signal_update", timeout=10)
            assert (removed["action"], removed["data"][0]["ts_code"]) == ("remove", "000001.SZ")
            await send_ticks(redis, keys, [tick("000001.SZ", 2), tick("600519.SH", 3)])
            after = await client.next(type="price_update", timeout=10)
            assert [row["ts_code"] for row in after["data"]] == ["600519.SH"]
            await client.drain(0.5)
        events, signal_ids = await stream_events(redis, keys, "volume_wave")
        assert sorted((e[3], e[4]) for e in events) == sorted([
            ("000001.SZ", tick("000001.SZ", 1).price), ("600519.SH", tick("600519.SH", 3).price)])
        assert len(signal_ids) == 3
        snapshot = await redis.hkeys(keys.snapshot("volume_wave"))
        assert sorted(snapshot) == [b"600519.SH"], "a removed signal leaves the strategy's list"
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]


async def _exists(redis, key: str) -> bool:
    return bool(await redis.exists(key))


async def _feed(redis, keys: Keys, codes: list[str], total: int, per_batch: int, pause: float) -> list:
    written = []
    n = 0
    while n < total:
        batch = [tick(codes[(n + i) % len(codes)], n + i) for i in range(min(per_batch, total - n))]
        written += await send_ticks(redis, keys, batch)
        n += len(batch)
        await asyncio.sleep(pause)
    return written


def _held(codes: list[str], rng: random.Random) -> dict[str, dict[str, float]]:
    """About half the stocks signalled, some by several strategies."""
    held: dict[str, dict[str, float]] = {}
    for code in codes:
        for strategy in STRATEGIES:
            if rng.random() < 0.3:
                held.setdefault(code, {})[strategy] = round(rng.uniform(9, 11), 2)
    return held


async def _signal_all(redis, keys: Keys, held: dict[str, dict[str, float]]) -> int:
    outbox = 0
    for code, by_strategy in sorted(held.items()):
        for strategy, price in sorted(by_strategy.items()):
            outbox += 1
            await send_signal(redis, keys, SignalChange(action="add", signal=make_signal(strategy, code, price)), outbox)
    return outbox


async def _check_exact(redis, keys: Keys, expected: set) -> Counter:
    seen: Counter = Counter()
    for strategy in STRATEGIES:
        events, _ = await stream_events(redis, keys, strategy)
        seen.update(events)
    twice = {k: n for k, n in seen.items() if n > 1}
    assert not twice, f"{len(twice)} events appended more than once, e.g. {next(iter(twice))}"
    missing, extra = expected - set(seen), set(seen) - expected
    assert not missing and not extra, f"{len(missing)} missing (e.g. {sorted(missing)[:3]}), {len(extra)} unexpected"
    return seen


@pytest.mark.timeout(300)
async def test_twenty_thousand_ticks_with_ten_kills_give_exactly_the_expected_events(
        redis_url, redis, keys, pg_url, tmp_path: Path):
    rng = random.Random(11)
    codes = [f"60{i:04d}.SH" for i in range(1000, 1040)]
    held = _held(codes, rng)
    await topics(redis, keys)
    signals = await _signal_all(redis, keys, held)
    worker = JoinWorker(redis_url, keys, tmp_path, "w").start()
    # a stream-table join: a tick sees the signals applied before it, so the ticks start after
    await wait_until(lambda: _reached(redis, keys, signals), 60, "the signals were never applied", [worker])
    # ~250 ticks/s for ~80 s: long enough for ten kills, each followed by a restart and a takeover
    feeder = asyncio.create_task(_feed(redis, keys, codes, 20_000, 100, 0.4))
    kills = 0
    try:
        while kills < 10:
            assert not feeder.done(), f"all ticks were written after only {kills} kills"
            # wait until this incarnation is appending, then kill it while it does
            await wait_until(lambda: _growing(redis, keys, 0.3), 90,
                             f"worker incarnation {worker.starts} never appended", [worker])
            await asyncio.sleep(rng.uniform(0.0, 0.8))
            before = await total_events(redis, keys)
            await asyncio.sleep(0.1)
            in_flight = await total_events(redis, keys) > before
            if not in_flight or feeder.done():
                continue
            worker.kill()
            kills += 1
            worker.start()
        written = await feeder
        expected = expected_events(written, held)
        assert kills == 10
        assert len(expected) > 5_000
        await wait_until(lambda: _reached(redis, keys, len(expected) + signals), 120,
                         "the last incarnation did not finish the work", [worker])
        await asyncio.sleep(1.0)  # anything still in flight would show as a duplicate
        await _check_exact(redis, keys, expected)
    finally:
        if not feeder.done():
            feeder.cancel()
        if worker.alive():
            assert worker.stop() == 0, worker.log()[-3000:]
    # and the archive, once the archiver has caught up, holds exactly the same events
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    try:
        store = ArchiveStore(pool)
        archiver = Archiver(redis, keys, store, consumer="t", refresh_s=0.1)
        stop = asyncio.Event()
        task = asyncio.create_task(archiver.run(stop))
        try:
            await wait_until(lambda: _archived(store, len(expected) + signals), 60, "the archive never caught up")
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
        archived: Counter = Counter()
        for strategy in STRATEGIES:
            epoch = await redis.get(keys.epoch(strategy))
            for stored in await store.read_after(strategy, epoch.decode(), None, limit=100_000):
                event = stored.event
                if not isinstance(event, SignalChange):
                    archived[(event.strategy, event.source_partition, event.source_offset, event.ts_code,
                              event.price)] += 1
        assert set(archived) == expected and max(archived.values()) == 1
    finally:
        await pool.close()


async def _growing(redis, keys: Keys, window: float) -> bool:
    before = await total_events(redis, keys)
    await asyncio.sleep(window)
    return await total_events(redis, keys) > before


async def _reached(redis, keys: Keys, n: int, strategies=STRATEGIES) -> bool:
    return await total_events(redis, keys, strategies) >= n


async def _archived(store: ArchiveStore, n: int) -> bool:
    return sum([await store.count(s) for s in STRATEGIES]) >= n


async def _owned_by(redis, keys: Keys, pid: int) -> int:
    """Partitions of the join's group owned by the worker process `pid` now."""
    owners = await redis.hgetall(keys.group("tickwave-join", "owners"))
    return sum(1 for owner in owners.values() if f"-{pid}-" in owner.decode())


async def test_two_workers_share_the_work_and_the_survivor_of_a_kill_finishes_it(redis_url, redis, keys,
                                                                                 tmp_path: Path):
    rng = random.Random(5)
    codes = [f"00{i:04d}.SZ" for i in range(2000, 2040)]
    held = _held(codes, rng)
    await topics(redis, keys)
    signals = await _signal_all(redis, keys, held)
    a = JoinWorker(redis_url, keys, tmp_path, "a").start()
    b = JoinWorker(redis_url, keys, tmp_path, "b").start()
    assert a.proc is not None and b.proc is not None
    feeder = asyncio.create_task(asyncio.sleep(0))
    try:
        await wait_until(lambda: _both_own(redis, keys, a.proc.pid, b.proc.pid), 60,
                         "the two workers never shared the partitions", [a, b])
        await wait_until(lambda: _reached(redis, keys, signals), 60, "the signals were never applied", [a, b])
        feeder = asyncio.create_task(_feed(redis, keys, codes, 8_000, 200, 0.25))
        await wait_until(lambda: _growing(redis, keys, 0.3), 30, "nothing was being appended", [a, b])
        assert not feeder.done(), "the kill must land mid-stream"
        assert await _owned_by(redis, keys, a.proc.pid) > 0
        a.kill()
        written = await feeder
        expected = expected_events(written, held)
        await wait_until(lambda: _reached(redis, keys, len(expected) + signals), 90,
                         "the survivor did not finish the work", [b])
        owners = await redis.hgetall(keys.group("tickwave-join", "owners"))
        assert await _owned_by(redis, keys, b.proc.pid) == len(owners) >= 12, "the survivor took every partition"
        await asyncio.sleep(1.0)
        await _check_exact(redis, keys, expected)
    finally:
        if not feeder.done():
            feeder.cancel()
        assert b.stop() == 0, b.log()[-3000:]


async def test_with_a_batch_window_every_tick_is_still_joined_exactly_once(redis_url, redis, keys, tmp_path: Path):
    """The worker waits for batches to fill (faust's take_events) instead of joining what has arrived."""
    rng = random.Random(3)
    codes = [f"60{i:04d}.SH" for i in range(3000, 3020)]
    held = _held(codes, rng)
    await topics(redis, keys)
    signals = await _signal_all(redis, keys, held)
    worker = JoinWorker(redis_url, keys, tmp_path, "w", TICKWAVE_WORKER_BATCH_WINDOW_S="0.02").start()
    try:
        await wait_until(lambda: _reached(redis, keys, signals), 60, "the signals were never applied", [worker])
        written = await _feed(redis, keys, codes, 2_000, 100, 0.01)
        expected = expected_events(written, held)
        await wait_until(lambda: _reached(redis, keys, len(expected) + signals), 60,
                         "the worker did not join every tick", [worker])
        await asyncio.sleep(0.5)
        await _check_exact(redis, keys, expected)
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]


async def _both_own(redis, keys: Keys, pid_a: int, pid_b: int) -> bool:
    return await _owned_by(redis, keys, pid_a) > 0 and await _owned_by(redis, keys, pid_b) > 0


async def test_a_bad_tick_is_dead_lettered_and_counted_and_the_join_goes_on(redis_url, redis, keys, tmp_path: Path):
    await topics(redis, keys)
    port = free_port()
    worker = JoinWorker(redis_url, keys, tmp_path, "w", TICKWAVE_WORKER_METRICS_PORT=str(port)).start()
    try:
        await send_signal(redis, keys, SignalChange(action="add", signal=make_signal("volume_wave", "600519.SH", 10.0)), 1)
        first = await send_ticks(redis, keys, [tick("600519.SH", 1)])
        p = partition_for("600519.SH", 4)
        bad_offset = await PartitionLog(redis, keys, "ticks").append(p, [
            encode_record(b"600519.SH", b'{"ts_code": "600519.SH", "price": "not a number"}'),
            encode_record(b"600519.SH", tick("600519.SH", 2).model_copy(update={"price": 0.0}).model_dump_json().encode()),
        ])
        last = await send_ticks(redis, keys, [tick("600519.SH", 3)])
        expected = expected_events(first + last, {"600519.SH": {"volume_wave": 10.0}})
        await wait_until(lambda: _reached(redis, keys, len(expected) + 1, ("volume_wave",)), 60,
                         "the join stopped at the bad tick", [worker])
        events, _ = await stream_events(redis, keys, "volume_wave")
        assert set(events) == expected and len(events) == 2
        letters = await redis.xrange(keys.dead_letters("join"))
        assert [f[b"origin"].decode() for _, f in letters] == [f"ticks/{p}/{bad_offset}", f"ticks/{p}/{bad_offset + 1}"]
        assert letters[0][1][b"reason"].startswith(b"undecodable tick")
        assert letters[1][1][b"reason"] == b"zero or negative price"
        assert letters[0][1][b"raw.v"] == b'{"ts_code": "600519.SH", "price": "not a number"}'
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
            text = await r.text()
        assert 'tickwave_join_rejected_total{reason="undecodable tick",topic="ticks"} 1.0' in text
        assert 'tickwave_join_rejected_total{reason="zero or negative price",topic="ticks"} 1.0' in text
        assert worker.alive()
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
