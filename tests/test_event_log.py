"""The per-strategy event streams: exactly-once append, snapshot, epoch, reads, and retention
that never outruns the archive group (Redis 7 and 6.2)."""

import asyncio

import pytest

from streams.events import HELD_BYTES, TRIMMED_UNARCHIVED, EventLog, parse_id
from tests.factories import price_change, price_changes, signal_change


@pytest.fixture
def log(any_redis, keys):
    return EventLog(any_redis, keys)


async def test_append_returns_time_ids_in_order(log):
    ids = await log.append_events("volume_wave", price_changes(5))
    assert len(ids) == 5
    assert [parse_id(i) for i in ids] == sorted(parse_id(i) for i in ids)
    read = await log.read_after("volume_wave", None)
    assert [s.id for s in read] == ids
    assert all(s.event.event_id == s.id for s in read)


async def test_a_repeated_append_writes_nothing(log, any_redis, keys):
    events = price_changes(10)
    first = await log.append_events("volume_wave", events)
    again = await log.append_events("volume_wave", events)
    assert again == []
    assert await any_redis.xlen(keys.events("volume_wave")) == len(first) == 10


async def test_only_positions_newer_than_recorded_are_appended(log):
    await log.append_events("volume_wave", price_changes(5))  # offsets 0..4
    ids = await log.append_events("volume_wave", price_changes(8))  # 0..7: only 5..7 are new
    events = await log.read_after("volume_wave", None)
    assert len(ids) == 3
    assert [s.event.source_offset for s in events] == list(range(8))


async def test_positions_are_per_partition_and_per_strategy(log):
    await log.append_events("volume_wave", price_changes(3, partition=0))
    assert len(await log.append_events("volume_wave", price_changes(3, partition=1))) == 3
    assert len(await log.append_events("breakout", price_changes(3, "breakout", partition=0))) == 3


async def test_signal_changes_are_always_appended(log):
    ids = await log.append_events("volume_wave", [signal_change("add"), signal_change("add")])
    assert len(ids) == 2


async def test_snapshot_is_the_latest_event_per_stock_after_interleaved_appends(log):
    events = price_changes(30)
    # interleave two writers' batches out of the natural order of stocks
    for batch in (events[0:7], events[7:8], events[8:20], events[20:30]):
        await log.append_events("volume_wave", batch)
    stored = await log.read_after("volume_wave", None)
    latest = {}
    for s in stored:
        latest[s.event.ts_code] = s
    snap = await log.snapshot("volume_wave")
    assert {s.event.ts_code: (s.id, s.event) for s in snap} == {c: (s.id, s.event) for c, s in latest.items()}


async def test_a_removed_signal_takes_the_stock_out_of_the_snapshot(log):
    await log.append_events("volume_wave", price_changes(3))
    await log.append_events("volume_wave", [signal_change("remove", ts_code="000001.SZ")])
    assert {s.event.ts_code for s in await log.snapshot("volume_wave")} == {"600519.SH", "300750.SZ"}


async def test_a_recreated_stream_gets_a_new_epoch_and_forgets_positions(log, any_redis, keys):
    await log.append_events("volume_wave", price_changes(3))
    old = await log.epoch("volume_wave")
    assert old
    await any_redis.delete(keys.events("volume_wave"))
    ids = await log.append_events("volume_wave", price_changes(3))
    assert len(ids) == 3  # positions of the deleted stream do not suppress the new one
    new = await log.epoch("volume_wave")
    assert new and new != old
    assert await log.origin_id("volume_wave") == ids[0]


async def test_latest_first_and_bounded_reads(log):
    ids = await log.append_events("volume_wave", price_changes(6))
    assert await log.latest_id("volume_wave") == ids[-1]
    assert await log.first_id("volume_wave") == ids[0]
    window = await log.read_after("volume_wave", ids[1], until_id=ids[3])
    assert [s.id for s in window] == ids[2:4]
    assert [s.id for s in await log.read_after("volume_wave", ids[0], count=2)] == ids[1:3]


async def test_unknown_strategy_reads_are_empty(log):
    assert await log.latest_id("nobody") is None
    assert await log.epoch("nobody") is None
    assert await log.snapshot("nobody") == []
    assert await log.read_after("nobody", None) == []


async def test_strategies_are_registered_on_first_append(log):
    await log.append_events("volume_wave", price_changes(1))
    await log.append_events("breakout", price_changes(1, "breakout"))
    assert await log.strategies() == ["breakout", "volume_wave"]


async def test_is_strategy_answers_from_the_set_and_creates_nothing(log, any_redis, keys):
    await log.append_events("volume_wave", price_changes(1))
    before = sorted([k async for k in any_redis.scan_iter(match=f"{keys.prefix}*")])
    assert await log.is_strategy("volume_wave") is True
    assert await log.is_strategy("made_up") is False
    assert sorted([k async for k in any_redis.scan_iter(match=f"{keys.prefix}*")]) == before


async def test_a_strategy_is_registered_again_when_redis_lost_its_keys(log, any_redis, keys):
    await log.append_events("volume_wave", price_changes(1))
    found = [k async for k in any_redis.scan_iter(match=f"{keys.prefix}*")]
    await any_redis.delete(*found)  # what a Redis restart without persistence leaves
    await log.append_events("volume_wave", price_changes(1, start=1))
    assert await log.strategies() == ["volume_wave"]


async def test_retention_by_length_trims_old_events(any_redis, keys):
    log = EventLog(any_redis, keys, maxlen=100, archive_group=None)
    for start in range(0, 1000, 100):
        await log.append_events("volume_wave", price_changes(100, start=start))
    kept = await any_redis.xlen(keys.events("volume_wave"))
    assert 100 <= kept < 1000
    assert await log.origin_id("volume_wave") != await log.first_id("volume_wave")


async def test_an_event_for_another_strategy_is_refused(log):
    with pytest.raises(ValueError):
        await log.append_events("volume_wave", [price_change("breakout")])


# --- retention never outruns the archive group ------------------------------------------------

async def kept_ids(client, keys, strategy="volume_wave"):
    return [eid.decode() for eid, _ in await client.xrange(keys.events(strategy))]


async def test_a_new_stream_starts_with_its_archive_group_which_holds_from_the_first_event(any_redis, keys):
    await EventLog(any_redis, keys).append_events("volume_wave", price_changes(1))
    await EventLog(any_redis, keys, archive_group=None).append_events("breakout", price_changes(1, "breakout"))
    assert [g["name"] for g in await any_redis.xinfo_groups(keys.events("volume_wave"))] == [b"archiver"]
    assert await any_redis.xinfo_groups(keys.events("breakout")) == []


async def test_retention_by_age_keeps_what_the_archive_group_has_not_acknowledged(any_redis, keys):
    log = EventLog(any_redis, keys, retention_ms=300)
    ids = []
    for start in range(0, 1000, 100):
        ids += await log.append_events("volume_wave", price_changes(100, start=start))
        await asyncio.sleep(0.06)
    assert await kept_ids(any_redis, keys) == ids, "nothing acknowledged: nothing may be trimmed"
    # the group reads 600 and acknowledges 500: trimming may now reach the 500th, and no further
    got = await any_redis.xreadgroup("archiver", "a", {keys.events("volume_wave"): ">"}, count=600)
    await any_redis.xack(keys.events("volume_wave"), "archiver", *[eid for eid, _ in got[0][1][:500]])
    await asyncio.sleep(0.35)
    ids += await log.append_events("volume_wave", price_changes(100, start=1000))
    kept = await kept_ids(any_redis, keys)
    assert kept == ids[ids.index(kept[0]):], "what is kept is the newest part, without holes"
    assert 0 < ids.index(kept[0]) <= 499, "trimmed, but kept the last acknowledged (archived) event and all after"


async def test_retention_by_length_keeps_what_the_archive_group_has_not_acknowledged(any_redis, keys):
    log = EventLog(any_redis, keys, maxlen=100)
    ids = []
    for start in range(0, 1000, 100):
        ids += await log.append_events("volume_wave", price_changes(100, start=start))
    assert await kept_ids(any_redis, keys) == ids
    got = await any_redis.xreadgroup("archiver", "a", {keys.events("volume_wave"): ">"}, count=1000)
    await any_redis.xack(keys.events("volume_wave"), "archiver", *[eid for eid, _ in got[0][1][:700]])
    ids += await log.append_events("volume_wave", price_changes(100, start=1000))
    kept = await kept_ids(any_redis, keys)
    assert kept == ids[ids.index(kept[0]):]
    assert 0 < ids.index(kept[0]) <= 699


async def test_a_held_stream_reports_its_memory_and_an_unheld_one_zero(any_redis, keys):
    held = EventLog(any_redis, keys, maxlen=100)
    for start in range(0, 300, 100):
        await held.append_events("volume_wave", price_changes(100, start=start))
    assert HELD_BYTES.labels("volume_wave")._value.get() == await any_redis.memory_usage(
        keys.events("volume_wave"), samples=5)
    free = EventLog(any_redis, keys, maxlen=100, archive_group=None)
    for start in range(0, 300, 100):
        await free.append_events("breakout", price_changes(100, "breakout", start=start))
    assert HELD_BYTES.labels("breakout")._value.get() == 0


async def test_past_the_ceiling_trimming_proceeds_and_the_loss_is_recorded_exactly(any_redis, keys):
    ids = []
    held = EventLog(any_redis, keys, maxlen=100)
    for start in range(0, 1000, 100):
        ids += await held.append_events("volume_wave", price_changes(100, start=start))
    size = await any_redis.memory_usage(keys.events("volume_wave"), samples=5)
    before = TRIMMED_UNARCHIVED.labels("volume_wave")._value.get()
    capped = EventLog(any_redis, keys, maxlen=100, hold_max_bytes=size // 2)
    ids += await capped.append_events("volume_wave", price_changes(100, start=1000))
    assert await kept_ids(any_redis, keys) == ids[1000:], "exactly MAXLEN kept past the ceiling"
    (record,) = await capped.gap_records("volume_wave")
    epoch = await capped.epoch("volume_wave")
    assert (record.epoch, record.first_id, record.last_id, record.lost) == (epoch, ids[0], ids[999], 1000)
    assert TRIMMED_UNARCHIVED.labels("volume_wave")._value.get() - before == 1000
    # under the ceiling again (100 kept): held; past it, the next trim continues the same range,
    # so the record is extended rather than a second one added
    ids += await capped.append_events("volume_wave", price_changes(100, start=1100))
    assert await kept_ids(any_redis, keys) == ids[1000:]
    tiny = EventLog(any_redis, keys, maxlen=100, hold_max_bytes=1)
    ids += await tiny.append_events("volume_wave", price_changes(100, start=1200))
    assert await kept_ids(any_redis, keys) == ids[1200:]
    (record,) = await capped.gap_records("volume_wave")
    assert (record.first_id, record.last_id, record.lost) == (ids[0], ids[1199], 1200)
    assert TRIMMED_UNARCHIVED.labels("volume_wave")._value.get() - before == 1200


async def test_past_the_ceiling_by_age_the_loss_is_recorded_exactly(any_redis, keys):
    ids = []
    held = EventLog(any_redis, keys, retention_ms=400)
    for start in range(0, 600, 100):
        ids += await held.append_events("volume_wave", price_changes(100, start=start))
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.45)
    capped = EventLog(any_redis, keys, retention_ms=400, hold_max_bytes=1)
    ids += await capped.append_events("volume_wave", price_changes(100, start=600))
    kept = await kept_ids(any_redis, keys)
    assert kept == ids[600:], "everything older than the retention is trimmed, exactly"
    (record,) = await capped.gap_records("volume_wave")
    assert (record.first_id, record.last_id, record.lost) == (ids[0], ids[599], 600)


async def test_trimming_keeps_the_newest_acknowledged_entry_so_redis_and_the_archive_overlap(any_redis, keys):
    # approximate trimming drops whole nodes; across 40 acknowledgement points some fall on a node's
    # last entry, where dropping the seam would show
    log = EventLog(any_redis, keys, retention_ms=1)
    key = keys.events("volume_wave")
    ids = await log.append_events("volume_wave", price_changes(40))
    got = await any_redis.xreadgroup("archiver", "a", {key: ">"}, count=40)
    for n, (eid, _) in enumerate(got[0][1]):
        await any_redis.xack(key, "archiver", eid)
        ids += await log.append_events("volume_wave", price_changes(1, start=40 + n))
        kept = await kept_ids(any_redis, keys)
        assert kept == ids[ids.index(kept[0]):] and ids.index(kept[0]) <= n, f"acknowledged up to {n}"


async def test_an_edge_nodes_group_does_not_hold_retention(any_redis, keys):
    # a dead edge node's group, never read, must not keep memory: only the archive group holds
    log = EventLog(any_redis, keys, maxlen=100)
    key = keys.events("volume_wave")
    ids = await log.append_events("volume_wave", price_changes(100))
    await any_redis.xgroup_create(key, "edge:dead-node", id="0")
    for start in range(100, 1000, 100):
        ids += await log.append_events("volume_wave", price_changes(100, start=start))
    got = await any_redis.xreadgroup("archiver", "a", {key: ">"}, count=1000)
    await any_redis.xack(key, "archiver", *[eid for eid, _ in got[0][1]])
    ids += await log.append_events("volume_wave", price_changes(100, start=1000))
    kept = await kept_ids(any_redis, keys)
    assert kept == ids[ids.index(kept[0]):] and len(kept) < 300, "trimmed to about MAXLEN"
