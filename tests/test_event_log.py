"""The per-strategy event streams: exactly-once append, snapshot, epoch, reads (Redis 7 and 6.2)."""

import pytest

from streams.events import EventLog, parse_id
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
    log = EventLog(any_redis, keys, maxlen=100)
    for start in range(0, 1000, 100):
        await log.append_events("volume_wave", price_changes(100, start=start))
    kept = await any_redis.xlen(keys.events("volume_wave"))
    assert 100 <= kept < 1000
    assert await log.origin_id("volume_wave") != await log.first_id("volume_wave")


async def test_an_event_for_another_strategy_is_refused(log):
    with pytest.raises(ValueError):
        await log.append_events("volume_wave", [price_change("breakout")])
