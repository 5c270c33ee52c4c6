"""K-line bars end to end: real `tickwave worker` processes on the Redis Streams driver, bars
checked against a brute-force computation from the same ticks."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from tests.driver_harness import wait_until
from tests.join_harness import JoinWorker, send_ticks, topics
from tests.kline_harness import brute_force_bars, day_ticks, stream_bars

CODES = [f"60{i:04d}.SH" for i in range(1000, 1012)] + [f"00{i:04d}.SZ" for i in range(1, 9)]


async def _count(redis, keys, codes) -> int:
    bars, _ = await stream_bars(redis, keys, codes)
    return len(bars)


def _exact(got: list, expected: list) -> None:
    twice = {k: n for k, n in Counter(got).items() if n > 1}
    assert not twice, f"{len(twice)} bars appended more than once, e.g. {next(iter(twice))}"
    missing, extra = set(expected) - set(got), set(got) - set(expected)
    assert not missing and not extra, (f"{len(missing)} missing (e.g. {sorted(missing)[:2]}), "
                                       f"{len(extra)} unexpected (e.g. {sorted(extra)[:2]})")


@pytest.mark.timeout(180)
async def test_bars_equal_a_brute_force_computation_from_the_same_ticks(redis_url, redis, keys, tmp_path: Path):
    await topics(redis, keys)
    steps = day_ticks(CODES)
    expected = brute_force_bars([t for s in steps for t in s])
    assert any("T11:29" in b[1] for b in expected) and any("T13:00" in b[1] for b in expected)
    assert not any("T12:" in b[1] or "T15:" in b[1] for b in expected), "the brute force made lunch or close bars"
    worker = JoinWorker(redis_url, keys, tmp_path, "w").start()
    try:
        for step in steps:
            await send_ticks(redis, keys, step)
        await wait_until(lambda: _reached(redis, keys, len(expected)), 120,
                         f"the worker never appended the {len(expected)} bars owed", [worker])
        await asyncio.sleep(1.5)  # nothing more may come: a second append of a bar would show now
        got, _ = await stream_bars(redis, keys, CODES)
        _exact(got, expected)
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]


async def _reached(redis, keys, n: int) -> bool:
    return await _count(redis, keys, CODES) >= n


@pytest.mark.timeout(300)
async def test_a_worker_killed_mid_minute_and_restarted_emits_every_bar_once_with_the_right_values(
        redis_url, redis, keys, tmp_path: Path):
    await topics(redis, keys)
    steps = day_ticks(CODES, seconds=(2, 9, 16, 23, 30, 37, 44, 51, 58))
    expected = brute_force_bars([t for s in steps for t in s])
    worker = JoinWorker(redis_url, keys, tmp_path, "w").start()
    written = 0

    async def feed(upto: int, pause: float) -> None:
        nonlocal written
        while written < upto:
            await send_ticks(redis, keys, steps[written])
            written += 1
            await asyncio.sleep(pause)

    try:
        await feed(40, 0.0)
        await wait_until(lambda: _some(redis, keys), 90, "the worker never appended a bar", [worker])
        feeder = asyncio.create_task(feed(len(steps), 0.05))
        for kill in range(2):
            await asyncio.sleep(1.0)
            before_ticks, before_bars = written, await _count(redis, keys, CODES)
            worker.kill()
            # the kill landed while ticks were in flight: more were written after it, and bars
            # were still owed
            await asyncio.sleep(0.3)
            assert written > before_ticks and not feeder.done(), "the feeder had stopped before the kill"
            assert 0 < before_bars < len(expected), f"kill {kill}: {before_bars} bars of {len(expected)} at the kill"
            worker.start()
        await feeder
        await wait_until(lambda: _reached(redis, keys, len(expected)), 150,
                         f"the restarted worker never appended the {len(expected)} bars owed", [worker])
        await asyncio.sleep(1.5)
        got, _ = await stream_bars(redis, keys, CODES)
        _exact(got, expected)
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]


async def _some(redis, keys) -> bool:
    return await _count(redis, keys, CODES) > 0


async def test_the_append_script_skips_a_bar_appended_before(redis, keys):
    """A worker killed after appending a bar but before its table write replays the tick that
    closed it: the second append of the same (stock, start) is fenced, whatever else comes with it."""
    from datetime import timedelta

    from streams.klines import BarLog
    from tests.kline_harness import DAY
    from schemas.klines import Bar

    def one(code: str, minute: int, close: float) -> Bar:
        start = DAY.replace(hour=10, minute=minute)
        return Bar(ts_code=code, start=start, end=start + timedelta(minutes=1), open=10, high=11, low=9,
                   close=close, volume=100, amount=1000.0, count=2)

    log = BarLog(redis, keys, hold=False)
    first = await log.append(1, [one(CODES[0], 0, 10.0), one(CODES[1], 0, 10.0)])
    again = await log.append(1, [one(CODES[0], 0, 10.5), one(CODES[1], 1, 10.0), one(CODES[0], 1, 10.0)])
    assert all(first) and again[0] is None and again[1] and again[2]
    closes = [b.close for b in await log.read(keys.kline(1, CODES[0]))]
    assert closes == [10.0, 10.0], "the replayed bar replaced or joined the first"
