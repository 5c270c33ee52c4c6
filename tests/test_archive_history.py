"""Migrations, the PostgreSQL archive and history across the Redis/archive boundary."""

import asyncio

import asyncpg
import pytest

from streams.archive import ArchiveStore
from streams.events import EventLog, Gap, parse_id
from streams.history import Reason, history
from streams.pg import create_pool, upgrade
from tests.factories import price_changes


@pytest.fixture
async def store(pg_url):
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    try:
        yield ArchiveStore(pool)
    finally:
        await pool.close()


async def test_upgrade_twice_applies_once(pg_url):
    assert await upgrade(pg_url) == ["0001_event_archive.sql", "0002_signals.sql", "0003_archive_gaps.sql",
                                     "0004_kline_archive.sql"]
    assert await upgrade(pg_url) == []


async def test_upgrade_twice_at_once_leaves_one_schema(pg_url):
    results = await asyncio.gather(upgrade(pg_url), upgrade(pg_url), upgrade(pg_url))
    assert sorted(len(r) for r in results) == [0, 0, 4]
    conn = await asyncpg.connect(pg_url)
    try:
        tables = await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() ORDER BY 1")
        assert [t["table_name"] for t in tables] == [
            "archive_gaps", "event_archive", "kline_archive", "schema_migrations", "signal_outbox", "signals"]
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 4
    finally:
        await conn.close()


async def test_archive_write_is_idempotent(redis, keys, store):
    log = EventLog(redis, keys)
    await log.append_events("volume_wave", price_changes(50))
    events = await log.read_after("volume_wave", None)
    epoch = await log.epoch("volume_wave")
    assert await store.write("volume_wave", epoch, events) == 50
    assert await store.write("volume_wave", epoch, events[10:]) == 0
    assert await store.count("volume_wave") == 50
    back = await store.read_after("volume_wave", epoch, events[9].id, limit=100)
    assert [(e.id, e.event) for e in back] == [(e.id, e.event) for e in events[10:]]


async def trimmed_stream(redis, keys, store, *, total=3000, keep=500, archive=True, archive_until=None):
    """`total` events of which Redis keeps about `keep` (approximate trimming); all archived
    (or the first `archive_until` only)."""
    log = EventLog(redis, keys, maxlen=keep, archive_group=None)  # archived by hand, no group holds
    ids = []
    for start in range(0, total, 100):
        ids += await log.append_events("volume_wave", price_changes(100, start=start))
        if archive and (archive_until is None or start < archive_until):
            # the archiver keeps up: archive each batch as it is written
            batch = await log.read_after("volume_wave", ids[-101] if len(ids) > 100 else None)
            await store.write("volume_wave", await log.epoch("volume_wave"), batch)
    first_kept = await log.first_id("volume_wave")
    assert first_kept != ids[0], "setup: Redis should have trimmed"
    return log, ids


async def test_history_across_the_trimmed_boundary_is_ordered_gapless_and_unique(redis, keys, store):
    log, ids = await trimmed_stream(redis, keys, store)
    epoch = await log.epoch("volume_wave")
    got = await history(log, store, "volume_wave", epoch=epoch, after_id=ids[99], limit=10_000)
    assert got.covered and got.reason is None
    assert [e.id for e in got.events] == ids[100:]
    assert [parse_id(e.id) for e in got.events] == sorted(parse_id(e.id) for e in got.events)


async def test_history_pages_through_the_boundary_with_a_limit(redis, keys, store):
    log, ids = await trimmed_stream(redis, keys, store)
    epoch = await log.epoch("volume_wave")
    seen, after = [], ids[0]
    while True:
        page = await history(log, store, "volume_wave", epoch=epoch, after_id=after, limit=333)
        assert page.covered
        if not page.events:
            break
        seen += [e.id for e in page.events]
        after = page.events[-1].id
    assert seen == ids[1:]


async def test_history_until_an_id_stops_there(redis, keys, store):
    log, ids = await trimmed_stream(redis, keys, store)
    got = await history(log, store, "volume_wave", epoch=None, after_id=ids[10], until_id=ids[2900], limit=10_000)
    assert [e.id for e in got.events] == ids[11:2901]


async def test_history_from_redis_alone_when_nothing_was_trimmed(redis, keys):
    log = EventLog(redis, keys)
    ids = await log.append_events("volume_wave", price_changes(20))
    got = await history(log, None, "volume_wave", epoch=None, after_id=ids[4], limit=100)
    assert got.covered and [e.id for e in got.events] == ids[5:]


async def test_history_for_an_old_epoch_cannot_cover(redis, keys, store):
    log = EventLog(redis, keys)
    await log.append_events("volume_wave", price_changes(5))
    old_epoch = await log.epoch("volume_wave")
    last = await log.latest_id("volume_wave")
    await redis.delete(keys.events("volume_wave"))
    await log.append_events("volume_wave", price_changes(5))
    got = await history(log, store, "volume_wave", epoch=old_epoch, after_id=last, limit=100)
    assert (got.covered, got.reason, got.events) == (False, Reason.EPOCH_CHANGED, [])
    assert got.epoch == await log.epoch("volume_wave") != old_epoch


async def test_history_of_an_unknown_strategy_cannot_cover(redis, keys, store):
    got = await history(EventLog(redis, keys), store, "nobody", epoch=None, after_id="1-0", limit=10)
    assert (got.covered, got.reason) == (False, Reason.UNKNOWN_STRATEGY)


async def test_history_says_gap_when_trimmed_events_were_never_archived(redis, keys, store):
    log, ids = await trimmed_stream(redis, keys, store, archive=False)
    got = await history(log, store, "volume_wave", epoch=None, after_id=ids[0], limit=10_000)
    assert (got.covered, got.reason, got.events) == (False, Reason.GAP, [])


async def test_history_without_an_archive_says_so(redis, keys, store):
    log, ids = await trimmed_stream(redis, keys, store)
    got = await history(log, None, "volume_wave", epoch=None, after_id=ids[0], limit=10)
    assert (got.covered, got.reason) == (False, Reason.NO_ARCHIVE)


async def test_history_reports_truncation(redis, keys):
    log = EventLog(redis, keys)
    ids = await log.append_events("volume_wave", price_changes(20))
    got = await history(log, None, "volume_wave", epoch=None, after_id=None, limit=5)
    assert [e.id for e in got.events] == ids[:5] and got.truncated


async def test_history_across_the_boundary_with_a_partly_archived_past_says_gap(redis, keys, store):
    # the archive ends (event 1,000) before Redis's oldest event (about 2,500): a hole between
    log, ids = await trimmed_stream(redis, keys, store, archive_until=1000)
    epoch = await log.epoch("volume_wave")
    assert await store.last_id("volume_wave", epoch) == ids[999]
    first_kept = await log.first_id("volume_wave")
    assert ids.index(first_kept) > 1000, "setup: Redis keeps nothing of the archived part"
    for after in (ids[10], ids[999], ids[1500]):
        got = await history(log, store, "volume_wave", epoch=epoch, after_id=after, limit=10_000)
        assert (got.covered, got.reason, got.events) == (False, Reason.GAP, [])


def gap(log_epoch, first, last, lost=5, reason="ceiling"):
    return Gap("volume_wave", log_epoch, first, last, lost, reason)


async def test_history_says_gap_for_a_range_touching_a_gap_in_the_archive(redis, keys, store):
    log, ids = await trimmed_stream(redis, keys, store)
    epoch = await log.epoch("volume_wave")
    await store.record_gap(gap(epoch, ids[1000], ids[1099], 100))
    for after, until in ((ids[10], None), (ids[999], ids[1000]), (ids[1050], ids[1060]), (ids[1098], None)):
        got = await history(log, store, "volume_wave", epoch=epoch, after_id=after, until_id=until, limit=10_000)
        assert (got.covered, got.reason, got.events) == (False, Reason.GAP, []), (after, until)
    # ranges that do not touch it are served as before
    before = await history(log, store, "volume_wave", epoch=epoch, after_id=ids[10], until_id=ids[999], limit=10_000)
    assert before.covered and [e.id for e in before.events] == ids[11:1000]
    after = await history(log, store, "volume_wave", epoch=epoch, after_id=ids[1099], limit=10_000)
    assert after.covered and [e.id for e in after.events] == ids[1100:]


async def test_history_says_gap_for_a_gap_record_still_in_redis(redis, keys, store):
    log, ids = await trimmed_stream(redis, keys, store)
    epoch = await log.epoch("volume_wave")
    # what the append script writes past the hold ceiling, before an archiver moves it
    await redis.xadd(keys.gaps("volume_wave"), {"epoch": epoch, "first": ids[1000], "last": ids[1099], "lost": "100",
                                               "next": ids[1100], "at_ms": "1"})
    got = await history(log, store, "volume_wave", epoch=epoch, after_id=ids[10], limit=10_000)
    assert (got.covered, got.reason) == (False, Reason.GAP)
    after = await history(log, store, "volume_wave", epoch=epoch, after_id=ids[1099], limit=10_000)
    assert after.covered and [e.id for e in after.events] == ids[1100:]


async def test_a_gap_is_stored_once_extended_by_what_it_grew_and_counts_only_unarchived_events(redis, keys, store):
    log = EventLog(redis, keys)
    ids = await log.append_events("volume_wave", price_changes(30))
    epoch = await log.epoch("volume_wave")
    await store.write("volume_wave", epoch, (await log.read_after("volume_wave", None))[:3])  # ids[0:3]
    assert await store.record_gap(gap(epoch, ids[0], ids[9], 10)) == (True, 7), "3 of the 10 reached the archive"
    assert await store.record_gap(gap(epoch, ids[0], ids[9], 10)) == (False, 0), "a record moved twice"
    assert await store.record_gap(gap(epoch, ids[0], ids[19], 20)) == (False, 10), "the same gap, extended"
    assert await store.record_gap(gap(epoch, ids[25], ids[27], None, "trimmed")) == (True, 0)
    assert await store.gaps("volume_wave") == [gap(epoch, ids[0], ids[19], 17), gap(epoch, ids[25], ids[27], None,
                                                                                       "trimmed")]
    assert await store.has_gap("volume_wave", epoch, ids[19], None) is True
    assert await store.has_gap("volume_wave", epoch, ids[19], ids[24]) is False
    assert await store.has_gap("volume_wave", "another", None, None) is False
