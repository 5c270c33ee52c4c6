"""Keys, partitioner and codec (pure), then append / range / groups / dead letters on real Redis."""

import asyncio
import json
import os
import subprocess
import sys

import pytest

from streams import groups
from streams.codec import (
    UPCASTERS,
    CorruptEntry,
    decode_event,
    decode_record,
    encode_event,
    encode_record,
    id_to_offset,
    offset_to_id,
)
from streams.deadletter import quarantine
from streams.connection import server_version
from streams.errors import BadKey, NoGroup, OffsetConflict
from streams.keys import Keys
from streams.log import PartitionLog
from streams.partition import murmur2, partition_for
from tests.test_schemas import PRICE, SIGNAL
from tests.topic_reads import append_timed, bounds, read_records

# --- keys -------------------------------------------------------------------------------


def test_every_key_of_a_strategy_shares_one_hash_tag():
    k = Keys("tw:")
    tagged = [k.events("volume_wave"), k.epoch("volume_wave"), k.snapshot("volume_wave"), k.positions("volume_wave")]
    assert {key[key.index("{"): key.index("}") + 1] for key in tagged} == {"{volume_wave}"}
    assert k.topic_partition("ticks", 3) == "tw:t:{ticks.3}"
    assert k.topic_sequence("ticks", 3).endswith("{ticks.3}")


@pytest.mark.parametrize("bad", ["", "a{b", "a}b", "with space", "x" * 101])
def test_names_that_would_break_hash_tags_are_refused(bad):
    with pytest.raises(BadKey):
        Keys().events(bad)


@pytest.mark.parametrize("good", ["ticks", "x" * 249, "app.agent-src-Order.account_id-repartition", "a_b-c.d"])
def test_every_topic_name_kafka_accepts_is_a_key(good):
    assert Keys("tw:").topic_partition(good, 0) == f"tw:t:{{{good}.0}}"


@pytest.mark.parametrize("bad", ["", "a{b", "a}b", "with space", "a|b", "x" * 250])
def test_topic_names_kafka_refuses_are_refused(bad):
    with pytest.raises(BadKey):
        Keys().topic_meta(bad)


# --- partitioner ------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("data", "expected"),
    [  # Kafka's own murmur2 test vectors (clients UtilsTest)
        (b"21", -973932308),
        (b"foobar", -790332482),
        (b"a-little-bit-long-string", -985981536),
        (b"a-little-bit-longer-string", -1486304829),
        (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        (b"abc", 479470107),
    ],
)
def test_murmur2_matches_kafka(data, expected):
    assert murmur2(data) == expected


def test_partitioner_is_stable_across_processes():
    codes = ["600519.SH", "000001.SZ", "300750.SZ", "688981.SH", "830799.BJ"]
    here = [partition_for(c, 8) for c in codes]
    script = f"from streams.partition import partition_for; print([partition_for(c, 8) for c in {codes!r}])"
    for seed in ("1", "4242"):
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        assert json.loads(out) == here
    assert len(set(partition_for(f"{i:06d}.SZ", 8) for i in range(1, 200))) == 8


# --- codec ------------------------------------------------------------------------------

def as_fields(values):
    return dict(zip([b"k", b"v", b"h", b"t"], values)) | {b"c": b"1"}


def test_record_round_trips_key_value_headers_and_time():
    fields = as_fields(encode_record(b"600519.SH", b'{"p":1}', [("trace", b"\x00\xff")], 1_700_000_000_123))
    rec = decode_record(offset_to_id(41), fields)
    assert (rec.key, rec.value, rec.headers, rec.timestamp_ms, rec.offset) == (
        b"600519.SH", b'{"p":1}', [("trace", b"\x00\xff")], 1_700_000_000_123, 41)


def test_dense_offsets_map_to_ids_and_back():
    assert offset_to_id(0) == "0-1"
    assert id_to_offset(b"0-1") == 0
    with pytest.raises(CorruptEntry):
        id_to_offset("1732415403000-0")


@pytest.mark.parametrize(
    "fields",
    [
        {b"garbage": b"1"},
        {b"k": b"", b"v": b"x", b"h": b"", b"t": b"soon", b"c": b"1"},
        {b"k": b"", b"v": b"x", b"h": b"{not json", b"t": b"1", b"c": b"1"},
        {b"k": b"", b"v": b"x", b"h": b"", b"t": b"1", b"c": b"99"},
    ],
)
def test_corrupt_records_raise_a_named_error(fields):
    with pytest.raises(CorruptEntry):
        decode_record("0-1", fields)


def test_events_round_trip_with_their_id():
    back = decode_event("1732415403000-7", encode_event(PRICE))
    assert back == PRICE.model_copy(update={"event_id": "1732415403000-7"})


def test_old_schema_versions_are_upcast_on_decode(monkeypatch):
    fields = encode_event(PRICE)
    old = json.loads(fields[b"e"])
    old["last_price"] = old.pop("price")  # what a v0 writer would have stored
    fields = fields | {b"e": json.dumps(old).encode(), b"s": b"0"}

    def upcast_v0_v1(data):
        data["price"] = data.pop("last_price")
        return data

    monkeypatch.setitem(UPCASTERS, (b"price", 0), upcast_v0_v1)
    assert decode_event("1-1", fields).price == PRICE.price


@pytest.mark.parametrize(
    "fields",
    [
        {b"e": b"{}", b"y": b"price", b"s": b"1", b"c": b"1"},
        {b"e": b"nope", b"y": b"price", b"s": b"1", b"c": b"1"},
        {b"e": b"{}", b"y": b"weather", b"s": b"1", b"c": b"1"},
        {b"e": b"{}", b"y": b"signal", b"s": b"5", b"c": b"1"},
    ],
)
def test_corrupt_events_raise_a_named_error(fields):
    with pytest.raises(CorruptEntry):
        decode_event("1-1", fields)


def test_signal_changes_round_trip():
    change = encode_event(__import__("schemas.events").events.SignalChange(action="remove", signal=SIGNAL))
    assert decode_event("5-0", change).signal == SIGNAL


# --- partition log on real Redis (6.2 and 7.x) -----------------------------------------

async def test_append_gives_dense_offsets_and_reads_back(any_redis, keys):
    log = PartitionLog(any_redis, keys, "ticks")
    assert await log.append(0, [encode_record(b"a", b"1"), encode_record(b"b", b"2")]) == 0
    assert await log.append(0, [encode_record(None, b"3")]) == 2
    records, bad = await read_records(any_redis, keys, "ticks", 0, 1)
    assert [(r.offset, r.key, r.value) for r in records] == [(1, b"b", b"2"), (2, None, b"3")]
    assert bad == []
    assert await bounds(any_redis, keys, "ticks", 0) == (0, 3)


async def test_append_many_writes_every_partition_in_one_round_trip(any_redis, keys):
    log = PartitionLog(any_redis, keys, "ticks")
    first = await log.append_many({p: [encode_record(b"k", str(i).encode()) for i in range(p + 1)] for p in range(4)})
    assert first == {0: 0, 1: 0, 2: 0, 3: 0}
    assert [(await bounds(any_redis, keys, "ticks", p))[1] for p in range(4)] == [1, 2, 3, 4]


async def test_trimming_moves_the_low_watermark_but_not_the_offsets(any_redis, keys):
    log = PartitionLog(any_redis, keys, "ticks", maxlen=100)
    for _ in range(10):
        await log.append(0, [encode_record(b"k", b"v")] * 100)
    low, high = await bounds(any_redis, keys, "ticks", 0)
    assert high == 1000
    assert 0 < low <= 900  # approximate trimming keeps at least MAXLEN entries
    records, _ = await read_records(any_redis, keys, "ticks", 0, 0, count=1)
    assert records[0].offset == low


async def test_lost_sequence_counter_continues_after_the_newest_entry(any_redis, keys):
    log = PartitionLog(any_redis, keys, "ticks")
    await log.append(2, [encode_record(b"k", b"v")] * 5)
    await any_redis.delete(keys.topic_sequence("ticks", 2))
    assert await log.append(2, [encode_record(b"k", b"v")]) == 5


async def test_a_conditional_append_lands_only_at_the_expected_offset(any_redis, keys):
    log = PartitionLog(any_redis, keys, "signals")
    assert await log.append(3, [encode_record(b"a", b"1")], expected=0) == 0
    with pytest.raises(OffsetConflict):  # a second writer that also saw the partition empty
        await log.append(3, [encode_record(b"b", b"2"), encode_record(b"c", b"3")], expected=0)
    assert await log.append(3, [encode_record(b"b", b"2")], expected=1) == 1
    with pytest.raises(OffsetConflict):  # the same append again, as after a lost reply
        await log.append(3, [encode_record(b"b", b"2")], expected=1)
    records, _ = await read_records(any_redis, keys, "signals", 3)
    assert [r.value for r in records] == [b"1", b"2"], "nothing written by the refused appends"


async def test_tails_give_each_partitions_next_offset_and_newest_record(any_redis, keys):
    log = PartitionLog(any_redis, keys, "signals")
    await log.append(1, [encode_record(b"a", b"1"), encode_record(b"b", b"2")])
    await log.append(2, [encode_record(b"c", b"3")])
    await any_redis.delete(keys.topic_sequence("signals", 2))  # counter lost: derived from the entry
    tails = await log.tails(3)
    assert [(t.next_offset, t.last.value if t.last else None) for t in tails.values()] == [
        (0, None), (2, b"2"), (1, b"3")]


# --- consumer groups ----------------------------------------------------------------------

async def test_group_create_is_idempotent(any_redis, keys):
    key = keys.events("g")
    assert await groups.ensure_group(any_redis, key, "edge") is True
    assert await groups.ensure_group(any_redis, key, "edge") is False


async def test_group_read_ack_and_pending(any_redis, keys):
    key = keys.events("g")
    await groups.ensure_group(any_redis, key, "archiver")
    ids = await append_timed(any_redis, key, [{b"n": b"1"}, {b"n": b"2"}])
    got = await groups.read_group(any_redis, "archiver", "c1", {key: ">"}, count=10)
    assert [eid for eid, _ in got[0][1]] == ids
    assert await groups.ack(any_redis, "archiver", [(key, ids[0])]) == 1
    pending = await groups.read_group(any_redis, "archiver", "c1", {key: "0"}, count=10)
    assert [eid for eid, _ in pending[0][1]] == [ids[1]]


async def test_idle_entries_of_a_dead_consumer_are_claimed(any_redis, keys):
    key = keys.events("g")
    await groups.ensure_group(any_redis, key, "archiver")
    ids = await append_timed(any_redis, key, [{b"n": str(i).encode()} for i in range(3)])
    await groups.read_group(any_redis, "archiver", "dead", {key: ">"}, count=10)
    assert await groups.claim_idle(any_redis, key, "archiver", "alive", min_idle_ms=60_000) == []
    await asyncio.sleep(0.05)
    claimed = await groups.claim_idle(any_redis, key, "archiver", "alive", min_idle_ms=20)
    assert [eid for eid, _ in claimed] == ids
    mine = await groups.read_group(any_redis, "archiver", "alive", {key: "0"}, count=10)
    assert len(mine[0][1]) == 3


async def test_a_blocked_group_read_whose_stream_is_deleted_raises_no_group(any_redis, keys):
    key = keys.events("g")
    await groups.ensure_group(any_redis, key, "edge", start_id="$")
    read = asyncio.create_task(groups.read_group(any_redis, "edge", "n1", {key: ">"}, block_ms=500))
    await asyncio.sleep(0.1)
    await any_redis.delete(key)
    try:
        assert await read == []  # Redis 6.2 lets the block run out...
    except NoGroup:
        pass  # ...Redis 7 ends it at once (UNBLOCKED)
    with pytest.raises(NoGroup):
        await groups.read_group(any_redis, "edge", "n1", {key: ">"})


async def test_group_lags_of_many_streams_in_one_round_trip(any_redis, keys):
    a, b, gone = keys.events("a"), keys.events("b"), keys.events("gone")
    for key in (a, b):
        await groups.ensure_group(any_redis, key, "edge", start_id="0")
    await append_timed(any_redis, a, [{b"n": b"1"}, {b"n": b"2"}, {b"n": b"3"}])
    lags = await groups.group_lags(any_redis, [a, b, gone], "edge")
    if await server_version(any_redis) >= (7,):
        assert lags == {a: 3, b: 0, gone: None}
    else:  # 6.2 does not report lag
        assert lags == {a: None, b: None, gone: None}


# --- dead letters -------------------------------------------------------------------------

async def test_a_corrupt_entry_goes_to_the_dead_letter_stream_with_its_reason(any_redis, keys):
    log = PartitionLog(any_redis, keys, "ticks")
    await log.append(0, [encode_record(b"600519.SH", b"{}")])
    # a foreign writer slips in an entry the codec cannot read
    await any_redis.xadd(log.stream_key(0), {b"v": b"\xff\xfe raw bytes"}, id="0-2")
    await any_redis.set(keys.topic_sequence("ticks", 0), 2)
    good, bad = await read_records(any_redis, keys, "ticks", 0, 0)
    assert [r.offset for r in good] == [0] and len(bad) == 1
    assert await quarantine(any_redis, keys, "ticks", log.stream_key(0), bad) == 1
    (dl_id, fields), = await any_redis.xrange(keys.dead_letters("ticks"))
    assert fields[b"raw.v"] == b"\xff\xfe raw bytes"
    assert b"codec version" in fields[b"reason"]
    assert fields[b"origin"] == f"{log.stream_key(0)}/0-2".encode()
