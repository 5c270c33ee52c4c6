"""The archiver process: everything archived exactly once, even when killed with SIGKILL, and
nothing lost to retention while it is away (or, past the hold ceiling, the loss counted and
recorded as a gap)."""

import asyncio
import os
import random
import signal
import subprocess
import sys
import time

import asyncpg
import pytest
import redis.exceptions as rex

from agents.archiver import GAPS, LOST, Archiver
from streams.archive import ArchiveStore
from streams.errors import ArchiveUnavailable
from streams.codec import id_before, parse_id
from streams.events import HELD_BYTES, TRIMMED_UNARCHIVED, EventLog, Gap
from streams.history import Reason, history
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


class ArchiverRun:
    """One archiver process of the kill test, and how to tell the moment to kill it."""

    def __init__(self, redis, key, db, consumer, proc):
        self.redis, self.key, self.db, self.consumer, self.proc = redis, key, db, consumer, proc
        self.started_ms = time.time() * 1000
        self.delivered_at_start = None

    async def start(self):
        self.delivered_at_start = await self.last_delivered()
        return self

    async def last_delivered(self):
        (info,) = await self.redis.xinfo_groups(self.key)
        return parse_id(info["last-delivered-id"].decode())

    async def holds_unacknowledged(self):
        """It holds unacknowledged entries delivered to this run of it (a restarted consumer of
        the same name finds its predecessor's pending entries: those do not count)."""
        rows = await self.redis.xpending_range(self.key, "archiver", min="-", max="+", count=10,
                                               consumername=self.consumer)
        age_ms = time.time() * 1000 - self.started_ms
        return any(r["time_since_delivered"] < age_ms - 50 for r in rows)

    async def holds_unarchived(self):
        """This run read entries past the archive's end: read, not yet committed."""
        delivered = await self.last_delivered()
        row = await self.db.fetchrow("SELECT ms, seq FROM event_archive ORDER BY ms DESC, seq DESC LIMIT 1")
        return delivered > self.delivered_at_start and (row is None or (row["ms"], row["seq"]) < delivered)


# unacknowledged: what the issue asks; unarchived: also catches an archiver that acknowledges
# before its COPY commits (pending entries are only the ones before the acknowledgement)
@pytest.mark.parametrize("moment", ["holds_unacknowledged", "holds_unarchived"])
async def test_archiver_killed_while_it_holds_entries_it_read_leaves_exactly_the_streams_events(
        redis, redis_url, keys, pg_url, moment):
    await upgrade(pg_url)
    log = EventLog(redis, keys)
    key = keys.events("volume_wave")
    await log.append_events("volume_wave", price_changes(1))  # register the strategy first
    db = await asyncpg.connect(pg_url)
    rng = random.Random(7)
    total, written = 20_000, 1
    run = await ArchiverRun(redis, key, db, "a-0", start_archiver(redis_url, pg_url, keys, "a-0")).start()
    kills = held_at_kill = 0
    try:
        while written < total:
            # a burst, then a kill once the archiver holds entries of it
            for _ in range(4):
                n = min(500, total - written)
                if n:
                    await log.append_events("volume_wave", price_changes(n, start=written))
                    written += n
            await asyncio.sleep(rng.uniform(0.0, 0.1))
            deadline = time.monotonic() + 20
            while not await getattr(run, moment)():
                assert time.monotonic() < deadline, f"{run.consumer} never reached {moment}"
                await asyncio.sleep(0.002)
            run.proc.send_signal(signal.SIGKILL)
            run.proc.wait(5)
            kills += 1
            # checked again after death, when it can do nothing more: the kill landed mid-batch
            held_at_kill += await getattr(run, moment)()
            # alternate: the same consumer name (re-reads its own pending) or a new one (claims)
            consumer = f"a-{kills % 2}-{kills if kills % 3 == 0 else 0}"
            run = await ArchiverRun(redis, key, db, consumer, start_archiver(redis_url, pg_url, keys, consumer)).start()
        stream_ids = [s.id for s in await log.read_after("volume_wave", None)]
        assert len(stream_ids) == total
        await wait_for(lambda: _eq(pg_url, "volume_wave", stream_ids), 60, "archive equal to the stream")
    finally:
        await db.close()
        run.proc.send_signal(signal.SIGTERM)
        try:
            run.proc.wait(10)
        except subprocess.TimeoutExpired:
            run.proc.kill()
    assert kills >= 5 and held_at_kill == kills, f"every kill should land while it {moment}"
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


# --- retention while the archiver is away (issue #13) -----------------------------------------

async def archive_until(client, keys, store, done, reason, consumer="t1", timeout=60, claim_idle_ms=30_000):
    """Run an archiver until `done()`; returns it (stopped)."""
    archiver = Archiver(client, keys, store, consumer=consumer, refresh_s=0.1, batch=500, claim_idle_ms=claim_idle_ms)
    stop = asyncio.Event()
    task = asyncio.create_task(archiver.run(stop))
    try:
        await wait_for(done, timeout, reason)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    return archiver


def counted(metric, strategy="volume_wave"):
    return metric.labels(strategy)._value.get()


async def write_during_downtime(log, ids, total, *, per_batch=100, pause=0.1):
    """`total` more events in batches over about total / per_batch * pause seconds."""
    start = len(ids)
    for at in range(start, start + total, per_batch):
        ids += await log.append_events("volume_wave", price_changes(per_batch, start=at))
        await asyncio.sleep(pause)


async def test_retention_shorter_than_the_archivers_downtime_loses_nothing(any_redis, keys, pg_url):
    # the measurement, scaled down: retention 2 s, the archiver away for 4 s of writes
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    store = ArchiveStore(pool)
    log = EventLog(any_redis, keys, retention_ms=2000)
    gaps_before = GAPS.labels("volume_wave", "ceiling")._value.get()
    try:
        ids = await log.append_events("volume_wave", price_changes(100))
        await archive_until(any_redis, keys, store, lambda: _eq(pg_url, "volume_wave", ids), "first events archived")
        held = []
        for _ in range(4):  # the archiver stopped for maintenance: 4,000 events over about 4 s
            await write_during_downtime(log, ids, 1000)
            held.append(counted(HELD_BYTES))
        assert await any_redis.xlen(keys.events("volume_wave")) >= 4000, "retention held while the archiver was away"
        assert held[-1] > 0, "the held memory is reported"
        await archive_until(any_redis, keys, store, lambda: _eq(pg_url, "volume_wave", ids), "archive caught up")
        # caught up, retention trims again, and history spans the seam with no hole
        await asyncio.sleep(2.1)
        ids += await log.append_events("volume_wave", price_changes(100, start=len(ids)))
        assert counted(HELD_BYTES) == 0
        assert 4000 < ids.index(await log.first_id("volume_wave")) <= 4100
        got = await history(log, store, "volume_wave", epoch=None, after_id=None, limit=10_000)
        assert got.covered and [e.id for e in got.events] == ids
        assert await store.gaps("volume_wave") == []
        assert GAPS.labels("volume_wave", "ceiling")._value.get() == gaps_before
    finally:
        await pool.close()


async def test_past_the_hold_ceiling_the_loss_is_counted_recorded_and_history_says_gap(any_redis, keys, pg_url):
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    store = ArchiveStore(pool)
    ids = await EventLog(any_redis, keys).append_events("volume_wave", price_changes(100))
    per_100 = await any_redis.memory_usage(keys.events("volume_wave"), samples=5)
    # room for about 1,500 held events, while 2 s of retention is about 2,000
    log = EventLog(any_redis, keys, retention_ms=2000, hold_max_bytes=per_100 * 15)
    trimmed_before, lost_before = counted(TRIMMED_UNARCHIVED), counted(LOST)
    try:
        await archive_until(any_redis, keys, store, lambda: _eq(pg_url, "volume_wave", ids), "first events archived")
        await write_during_downtime(log, ids, 4000)
        kept = [s.id for s in await log.read_after("volume_wave", None)]
        lost = ids[100:ids.index(kept[0])]
        assert kept == ids[len(ids) - len(kept):] and lost, "setup: the ceiling was passed"
        assert counted(TRIMMED_UNARCHIVED) - trimmed_before == len(lost), "the writer counts the loss exactly"
        archiver = await archive_until(any_redis, keys, store,
                                       lambda: _eq(pg_url, "volume_wave", ids[:100] + kept), "archive caught up")
        epoch = await log.epoch("volume_wave")
        assert await store.gaps("volume_wave") == [Gap("volume_wave", epoch, lost[0], lost[-1], len(lost), "ceiling")]
        assert (archiver.stats.gaps, archiver.stats.lost) == (1, len(lost))
        assert counted(LOST) - lost_before == len(lost)
        assert await log.gap_records("volume_wave") == [], "moved into the archive"
        got = await history(log, store, "volume_wave", epoch=epoch, after_id=ids[50], limit=10_000)
        assert (got.covered, got.reason, got.events) == (False, Reason.GAP, [])
        got = await history(log, store, "volume_wave", epoch=epoch, after_id=lost[-1], limit=10_000)
        assert got.covered and [e.id for e in got.events] == kept
    finally:
        await pool.close()


async def test_a_trim_nobody_recorded_is_found_recorded_and_reported(any_redis, keys, pg_url):
    # a writer without an archive group trims before any archiver ran: the group comes too late
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    store = ArchiveStore(pool)
    log = EventLog(any_redis, keys, maxlen=100, archive_group=None)
    ids = []
    for start in range(0, 1000, 100):
        ids += await log.append_events("volume_wave", price_changes(100, start=start))
    kept = [s.id for s in await log.read_after("volume_wave", None)]
    gaps_before, lost_before = GAPS.labels("volume_wave", "trimmed")._value.get(), counted(LOST)
    try:
        archiver = await archive_until(any_redis, keys, store, lambda: _eq(pg_url, "volume_wave", kept), "kept archived")
        epoch = await log.epoch("volume_wave")
        assert await store.gaps("volume_wave") == [Gap("volume_wave", epoch, ids[0], id_before(kept[0]), None, "trimmed")]
        assert GAPS.labels("volume_wave", "trimmed")._value.get() - gaps_before == 1
        assert counted(LOST) == lost_before and archiver.stats.lost == 0, "how many is unknown: nothing counted"
        got = await history(log, store, "volume_wave", epoch=epoch, after_id=ids[0], limit=10_000)
        assert (got.covered, got.reason) == (False, Reason.GAP)
    finally:
        await pool.close()


@pytest.mark.parametrize("consumer", ["t1", "t3"])  # t1 re-reads its own pending entries, t3 claims them
async def test_pending_entries_trimmed_under_the_archiver_are_acknowledged_and_counted(any_redis, keys, pg_url,
                                                                                      consumer):
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    store = ArchiveStore(pool)
    log = EventLog(any_redis, keys)
    key = keys.events("volume_wave")
    ids = await log.append_events("volume_wave", price_changes(20))
    epoch = await log.epoch("volume_wave")
    # t1 read 0..9 and died; t2 archived 10..19; then a trim by hand removed 0..7 from under t1
    await any_redis.xreadgroup("archiver", "t1", {key: ">"}, count=10)
    await any_redis.xreadgroup("archiver", "t2", {key: ">"}, count=10)
    await store.write("volume_wave", epoch, (await log.read_after("volume_wave", ids[9])))
    await any_redis.xack(key, "archiver", *ids[10:])
    await any_redis.xtrim(key, minid=ids[8], approximate=False)
    try:
        async def done():
            return await _eq(pg_url, "volume_wave", ids[8:]) and (await any_redis.xpending(key, "archiver"))[
                "pending"] == 0
        archiver = await archive_until(any_redis, keys, store, done, "the rest archived, the trimmed acknowledged",
                                       consumer=consumer, claim_idle_ms=100)
        assert await store.gaps("volume_wave") == [Gap("volume_wave", epoch, ids[0], ids[7], 8, "trimmed")]
        assert (archiver.stats.gaps, archiver.stats.lost, archiver.stats.rejected) == (1, 8, 0)
    finally:
        await pool.close()


async def test_an_entry_deleted_before_it_was_archived_is_recorded_on_redis_7(redis, keys, pg_url):
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    store = ArchiveStore(pool)
    log = EventLog(redis, keys)
    ids = await log.append_events("volume_wave", price_changes(20))
    await redis.xdel(keys.events("volume_wave"), ids[12])
    try:
        await archive_until(redis, keys, store,
                            lambda: _eq(pg_url, "volume_wave", ids[:12] + ids[13:]), "the rest archived")
        epoch = await log.epoch("volume_wave")
        assert await store.gaps("volume_wave") == [Gap("volume_wave", epoch, "0-1", ids[12], None, "deleted")]
    finally:
        await pool.close()


class FlakyRedis:
    """The archiver's client, whose `method` fails with a dropped connection the first `times` calls."""

    def __init__(self, client, method, times=2):
        self._client, self._method, self._left = client, method, times
        self.failed = 0

    def __getattr__(self, name):
        real = getattr(self._client, name)
        if name != self._method:
            return real

        async def flaky(*args, **kwargs):
            if self._left:
                self._left -= 1
                self.failed += 1
                raise rex.ConnectionError(f"injected: connection dropped in {name}")
            return await real(*args, **kwargs)
        return flaky


@pytest.mark.parametrize("method", [
    "smembers", "get", "hget", "xgroup_create", "xreadgroup", "xautoclaim", "xinfo_groups",
    "xrange", "xinfo_stream",
])
async def test_a_dropped_redis_connection_anywhere_in_the_archiver_does_not_end_it(redis, keys, pg_url, method):
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    log = EventLog(redis, keys)
    ids = await log.append_events("volume_wave", price_changes(300))
    flaky = FlakyRedis(redis, method)
    archiver = Archiver(flaky, keys, ArchiveStore(pool), consumer="t1", refresh_s=0.05, batch=100, claim_idle_ms=50)
    stop = asyncio.Event()
    task = asyncio.create_task(archiver.run(stop))
    try:
        await wait_for(lambda: _eq(pg_url, "volume_wave", ids), 20, "everything archived")
        await wait_for(lambda: _true(flaky.failed == 2 or task.done()), 20, f"{method} to be called and fail")
        ids += await log.append_events("volume_wave", price_changes(100, start=300))
        await wait_for(lambda: _eq(pg_url, "volume_wave", ids), 20, "archiving goes on after the errors")
        assert not task.done(), "the archiver ended"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await pool.close()


async def _true(value):
    return value


# refilled at once: on 6.2 the archiver's blocked read goes on into the new stream (its group came
# with it); after a pause: the archiver has found the stream gone first
@pytest.mark.parametrize("pause", [0.0, 1.0])
async def test_a_stream_recreated_under_the_archiver_is_archived_under_its_new_epoch(any_redis, keys, pg_url, pause):
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    store = ArchiveStore(pool)
    log = EventLog(any_redis, keys)
    first = await log.append_events("volume_wave", price_changes(10))
    old_epoch = await log.epoch("volume_wave")
    archiver = Archiver(any_redis, keys, store, consumer="t1", refresh_s=0.1, batch=100)
    stop = asyncio.Event()
    task = asyncio.create_task(archiver.run(stop))
    try:
        await wait_for(lambda: _eq(pg_url, "volume_wave", first), 20, "first epoch archived")
        await any_redis.delete(keys.events("volume_wave"))
        await asyncio.sleep(pause)
        second = await log.append_events("volume_wave", price_changes(10))
        new_epoch = await log.epoch("volume_wave")
        assert new_epoch != old_epoch

        async def both():
            return (await store.read_after("volume_wave", new_epoch, None, limit=100),
                    await store.read_after("volume_wave", old_epoch, None, limit=100))
        await wait_for(lambda: _ids_are(both, second, first), 20, "second epoch archived under its own epoch")
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await pool.close()


async def _ids_are(read, new, old):
    got_new, got_old = await read()
    return [e.id for e in got_new] == new and [e.id for e in got_old] == old


class GapWritesFailOnce:
    """The archive, whose first gap write finds PostgreSQL gone."""

    def __init__(self, store):
        self._store, self.failed = store, False

    def __getattr__(self, name):
        return getattr(self._store, name)

    async def record_gap(self, gap):
        if not self.failed:
            self.failed = True
            raise ArchiveUnavailable("injected: PostgreSQL went away")
        return await self._store.record_gap(gap)


async def test_a_gap_record_outlives_an_archive_outage(redis, keys, pg_url):
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    ids = []
    for start in range(0, 1000, 100):
        ids += await EventLog(redis, keys, maxlen=100).append_events("volume_wave", price_changes(100, start=start))
    capped = EventLog(redis, keys, maxlen=100, hold_max_bytes=1)
    ids += await capped.append_events("volume_wave", price_changes(100, start=1000))
    epoch = await capped.epoch("volume_wave")
    store = GapWritesFailOnce(ArchiveStore(pool))
    expected = [Gap("volume_wave", epoch, ids[0], ids[999], 1000, "ceiling")]

    async def moved():
        return await store.gaps("volume_wave") == expected and await capped.gap_records("volume_wave") == []
    try:
        await archive_until(redis, keys, store, moved, "the gap moved into the archive after the outage")
        assert store.failed
    finally:
        await pool.close()
