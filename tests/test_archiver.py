"""The archiver process: everything archived exactly once, even when killed with SIGKILL."""

import asyncio
import os
import random
import signal
import subprocess
import sys
import time

import asyncpg
import pytest

from agents.archiver import Archiver
from streams.archive import ArchiveStore
from streams.events import EventLog
from streams.pg import create_pool, upgrade
from tests.factories import price_changes


async def archived_ids(pg_url, strategy="volume_wave"):
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT ms, seq FROM event_archive WHERE strategy = $1 ORDER BY ms, seq", strategy)
        return [f"{r['ms']}-{r['seq']}" for r in rows]
    finally:
        await conn.close()


async def wait_for(predicate, timeout, reason):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"timed out after {timeout}s waiting for {reason}")


async def test_archiver_copies_every_strategy_including_new_ones(redis, keys, pg_url):
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    log = EventLog(redis, keys)
    a_ids = await log.append_events("volume_wave", price_changes(300))
    archiver = Archiver(redis, keys, ArchiveStore(pool), consumer="t1", refresh_s=0.1, batch=100)
    stop = asyncio.Event()
    task = asyncio.create_task(archiver.run(stop))
    try:
        await wait_for(lambda: _eq(pg_url, "volume_wave", a_ids), 10, "volume_wave archived")
        b_ids = await log.append_events("breakout", price_changes(50, "breakout"))  # a strategy born later
        await wait_for(lambda: _eq(pg_url, "breakout", b_ids), 10, "breakout picked up and archived")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await pool.close()
    pending = await redis.xpending(keys.events("volume_wave"), "archiver")
    assert pending["pending"] == 0, "everything archived is acknowledged"


async def _eq(pg_url, strategy, ids):
    return await archived_ids(pg_url, strategy) == ids


async def test_a_corrupt_event_is_dead_lettered_and_the_rest_archived(redis, keys, pg_url):
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    log = EventLog(redis, keys)
    good = await log.append_events("volume_wave", price_changes(3))
    bad_id = (await redis.xadd(keys.events("volume_wave"), {b"e": b"{oops", b"y": b"price", b"s": b"1", b"c": b"1"})).decode()
    good += await log.append_events("volume_wave", price_changes(2, start=3))
    archiver = Archiver(redis, keys, ArchiveStore(pool), consumer="t1", refresh_s=0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(archiver.run(stop))
    try:
        await wait_for(lambda: _eq(pg_url, "volume_wave", good), 10, "good events archived")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await pool.close()
    (dl_id, fields), = await redis.xrange(keys.dead_letters("archiver"))
    assert fields[b"raw.e"] == b"{oops"
    assert fields[b"origin"].decode().endswith(bad_id)
    assert archiver.stats.rejected == 1


def start_archiver(redis_url, pg_url, keys, consumer, stderr=subprocess.DEVNULL):
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "DATABASE_URL": pg_url,
        "TICKWAVE_KEY_PREFIX": keys.prefix,
        "TICKWAVE_ARCHIVE_CONSUMER": consumer,
        "TICKWAVE_ARCHIVE_CLAIM_IDLE_MS": "300",
        "TICKWAVE_ARCHIVE_REFRESH_S": "0.2",
        "TICKWAVE_ARCHIVE_BATCH": "500",
        "TICKWAVE_ARCHIVE_METRICS_PORT": "0",
    }
    return subprocess.Popen([sys.executable, "-m", "tickwave", "archive"], env=env,
                            stdout=subprocess.DEVNULL, stderr=stderr)


async def test_archiver_killed_at_random_moments_leaves_exactly_the_streams_events(redis, redis_url, keys, pg_url):
    await upgrade(pg_url)
    log = EventLog(redis, keys)
    await log.append_events("volume_wave", price_changes(1))  # register the strategy first
    rng = random.Random(7)
    total, written = 20_000, 1
    proc = start_archiver(redis_url, pg_url, keys, "a-0")
    kills = 0
    try:
        while written < total:
            # a burst, then a kill while the archiver is busy with it
            for _ in range(4):
                n = min(500, total - written)
                if n:
                    await log.append_events("volume_wave", price_changes(n, start=written))
                    written += n
            await asyncio.sleep(rng.uniform(0.02, 0.25))
            proc.send_signal(signal.SIGKILL)
            proc.wait(5)
            kills += 1
            # alternate: the same consumer name (re-reads its own pending) or a new one (claims)
            proc = start_archiver(redis_url, pg_url, keys, f"a-{kills % 2}-{kills if kills % 3 == 0 else 0}")
            await asyncio.sleep(0.3)  # let it start and pick up some work before the next burst
        stream_ids = [s.id for s in await log.read_after("volume_wave", None)]
        assert len(stream_ids) == total
        await wait_for(lambda: _eq(pg_url, "volume_wave", stream_ids), 60, "archive equal to the stream")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert kills >= 3, "the test should have killed the archiver several times"
    assert len(set(await archived_ids(pg_url))) == total


async def test_archiver_stops_cleanly_on_sigterm(redis, redis_url, keys, pg_url, tmp_path):
    await upgrade(pg_url)
    log = EventLog(redis, keys)
    await log.append_events("volume_wave", price_changes(100))
    with open(tmp_path / "stderr", "wb") as sink:
        proc = start_archiver(redis_url, pg_url, keys, "clean", stderr=sink)
        await wait_for(lambda: _count(pg_url, 100), 20, "first events archived")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    err = (tmp_path / "stderr").read_text()
    assert "archiver stopped" in err and "Traceback" not in err


async def _count(pg_url, n):
    return len(await archived_ids(pg_url)) == n


async def test_archive_lag_is_reported_while_the_archiver_is_busy(redis, keys, pg_url, monkeypatch):
    import agents.archiver as archiver_module
    from agents.archiver import LAG_ENTRIES, LAG_SECONDS

    monkeypatch.setattr(archiver_module, "LAG_EVERY_S", 0.0)
    LAG_ENTRIES.labels("volume_wave").set(0)  # the gauge is process-wide: start from a known value
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    log = EventLog(redis, keys)
    for start in range(0, 3000, 500):
        await log.append_events("volume_wave", price_changes(500, start=start))
    lags = []
    archiver = Archiver(redis, keys, ArchiveStore(pool), consumer="t1", refresh_s=0.1, batch=200)
    stop = asyncio.Event()

    def progress(stats):
        lags.append((LAG_ENTRIES.labels("volume_wave")._value.get(), LAG_SECONDS.labels("volume_wave")._value.get()))
        if stats.archived >= 3000:
            stop.set()

    archiver.on_progress = progress
    await asyncio.wait_for(archiver.run(stop), 30)
    await pool.close()
    # the gauges moved while batches were still waiting, not only once the archiver went idle
    assert any(entries > 0 for entries, _ in lags[1:-1]), lags[:5]
