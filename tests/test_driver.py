"""The faust driver in-process: registration, start-up errors, the producer's contract,
topics and retention, and the group's fenced commits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import faust
import pytest
from faust.exceptions import ImproperlyConfigured, ProducerSendError
from faust.transport import by_url
from faust.types import TP

from streams.codec import decode_record, encode_record
from streams.connection import AnyRedis
from streams.driver import Transport
from streams.driver.group import Group
from streams.driver.topics import Topics
from streams.errors import StreamUnavailable
from streams.keys import Keys
from streams.log import PartitionLog
from streams.partition import partition_for
from tests.driver_harness import broker_url, produce
from tests.topic_reads import read_entries
from tickwave.servers import free_port


def make_app(url: str, **conf) -> faust.App:
    return faust.App("drivertest", broker=url, web_enabled=False, topic_partitions=8, **conf)


@pytest.fixture
async def producer(redis_url: str, keys: Keys, redis: AnyRedis) -> AsyncIterator[faust.types.ProducerT]:
    app = make_app(broker_url(redis_url, keys))
    await app.producer.start()
    try:
        yield app.producer
    finally:
        await app.producer.stop()


# --- registration and start-up ------------------------------------------------------------

@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://127.0.0.1:6380/0",
                                 "redis+cluster://127.0.0.1:7000/0", "rediss+cluster://127.0.0.1:7000/0"])
def test_each_redis_scheme_selects_the_driver_through_the_faust_transports_entry_point(url):
    assert by_url(url) is Transport
    assert type(make_app(url).transport) is Transport


@pytest.mark.parametrize("query, named", [
    ("session_timeout=soon", "session_timeout"),
    ("heartbeat_interval=-1", "heartbeat_interval"),
    ("session_timeout=2&heartbeat_interval=1.5", "heartbeat_interval"),
    ("prefix=a{b}", "prefix"),
])
def test_a_bad_broker_option_fails_when_the_app_is_built_naming_it(query, named):
    with pytest.raises(ImproperlyConfigured, match=named):
        make_app(f"redis://127.0.0.1:6379/0?{query}").transport


def test_exactly_once_is_refused_at_start_up_with_the_reason():
    with pytest.raises(ImproperlyConfigured, match="at-least-once"):
        make_app("redis://127.0.0.1:6379/0", processing_guarantee="exactly_once").transport


def test_an_app_id_that_cannot_be_a_key_is_refused_at_start_up():
    with pytest.raises(ImproperlyConfigured, match="app id"):
        faust.App("bad{id}", broker="redis://127.0.0.1:6379/0").transport


async def test_an_unreachable_redis_fails_start_up_naming_the_url():
    url = f"redis://127.0.0.1:{free_port()}/0?connect_timeout=0.5"
    app = make_app(url)
    started = time.monotonic()
    with pytest.raises(StreamUnavailable, match="did not answer within 0.5 s"):
        await app.producer.start()
    assert time.monotonic() - started < 5
    await app.producer.stop()


# --- producer --------------------------------------------------------------------------------

async def test_send_and_wait_returns_the_key_partition_and_dense_offsets(producer, keys):
    first = await producer.send_and_wait("prices", b"600519.SH", b"1", None, None, None)
    second = await producer.send_and_wait("prices", b"600519.SH", b"2", None, None, None)
    assert first.partition == second.partition == partition_for(b"600519.SH", 8)
    assert (first.offset, second.offset) == (0, 1)
    assert first.topic_partition == TP("prices", first.partition)
    other = (first.partition + 1) % 8
    explicit = await producer.send_and_wait("prices", b"600519.SH", b"3", other, None, None)
    assert (explicit.partition, explicit.offset) == (other, 0), "an explicit partition was not honoured"


async def test_keys_values_headers_and_timestamps_round_trip(producer, redis, keys):
    meta = await producer.send_and_wait("rt", b"k\x00\xff", b"\x01\x02", 0, 1_700_000_000.25,
                                        [("trace", b"\x00\xff"), ("n", b"1")])
    tombstone = await producer.send_and_wait("rt", b"k", None, 0, None, {"h": b"v"})
    empty = await producer.send_and_wait("rt", None, b"", 0, None, None)
    entries = await read_entries(redis, keys, "rt", 0)
    records = [decode_record(*e) for e in entries]
    assert [r.offset for r in records] == [meta.offset, tombstone.offset, empty.offset]
    assert (records[0].key, records[0].value, records[0].headers, records[0].timestamp_ms) == (
        b"k\x00\xff", b"\x01\x02", [("trace", b"\x00\xff"), ("n", b"1")], 1_700_000_000_250)
    assert (records[1].value, records[1].headers) == (None, [("h", b"v")]), "a tombstone must stay None"
    assert (records[2].key, records[2].value) == (None, b"")


async def test_every_producer_uses_the_partition_count_stored_in_redis(producer, redis, keys):
    # another writer (ingest, another app) declared the topic first with 3 partitions
    await Topics(redis, keys, default_partitions=3).ensure(["ticks"])
    for code in (b"600519.SH", b"000001.SZ", b"300750.SZ", b"688981.SH", b"430047.BJ"):
        sent = await producer.send_and_wait("ticks", code, b"{}", None, None, None)
        assert sent.partition == partition_for(code, 3)
    with pytest.raises(ProducerSendError, match="has no partition 5"):
        await producer.send("ticks", b"k", b"v", 5, None, None)


async def test_sends_queued_without_waiting_are_all_written_by_stop(redis_url, keys, redis):
    app = make_app(broker_url(redis_url, keys))
    await app.producer.start()
    futures = [await app.producer.send("bulk", None, str(i).encode(), 0, None, None) for i in range(3000)]
    await app.producer.stop()
    assert all(f.done() for f in futures)
    assert [f.result().offset for f in futures] == list(range(3000))
    entries = await read_entries(redis, keys, "bulk", 0, 0, 5000)
    assert [decode_record(*e).value for e in entries] == [str(i).encode() for i in range(3000)]


async def test_sends_made_while_redis_is_away_are_held_and_written_when_it_returns(keys):
    from streams.connection import connect
    from tickwave import servers

    own = servers.start_redis()
    app = make_app(broker_url(own.url, keys))
    await app.producer.start()
    client = connect(own.url)
    try:
        await app.producer.send_and_wait("held", None, b"before", 0, None, None)
        own.halt()
        futures = [await app.producer.send("held", None, str(i).encode(), 0, None, None) for i in range(50)]
        await asyncio.sleep(1.0)
        assert not any(f.done() for f in futures), "a send 'succeeded' with Redis down"
        own.start()  # without persistence it comes back empty: the held records are all there is
        await asyncio.wait_for(app.producer.flush(), 20)
        entries = await read_entries(client, keys, "held", 0)
        assert [decode_record(*e).value for e in entries] == [str(i).encode() for i in range(50)]
    finally:
        await app.producer.stop()
        await client.aclose()
        own.stop()


# --- topics -----------------------------------------------------------------------------------

async def test_a_topic_keeps_the_settings_of_its_first_declaration(redis, keys):
    first = await Topics(redis, keys, default_partitions=8).create("orders", 4, retention_ms=60_000)
    again = await Topics(redis, keys, default_partitions=8).create("orders", 12)
    assert first == again
    assert (again.partitions, again.retention_ms) == (4, 60_000)


async def test_retention_trims_entries_older_than_the_topic_keeps(redis, keys):
    topics = Topics(redis, keys, default_partitions=1)
    await topics.create("old", 1, retention_ms=60_000)
    now = int(time.time() * 1000)
    log = PartitionLog(redis, keys, "old")
    await log.append(0, [encode_record(None, b"stale", None, now - 120_000) for _ in range(700)])
    await log.append(0, [encode_record(None, b"fresh", None, now - 1_000) for _ in range(5)])
    assert await topics.trim_expired(["old"], now_ms=now) == 700
    low, high = (await topics.watermarks([TP("old", 0)]))[TP("old", 0)]
    assert (low, high) == (700, 705)
    assert [decode_record(*e).value for e in await read_entries(redis, keys, "old", 0)] == [b"fresh"] * 5


async def test_a_changelog_declared_compacting_is_never_trimmed(redis_url, keys, redis):
    transport = make_app(broker_url(redis_url, keys)).transport
    await transport.acquire()
    try:
        settings = await transport.create_topic("app-table-changelog", 8, retention=60.0, compacting=True)
        capped = await transport.create_topic("capped", 2, config={"redis.maxlen": 1000})
    finally:
        await transport.release()
    assert (settings.retention_ms, settings.maxlen) == (0, 0)
    assert capped.maxlen == 1000


# --- the group ---------------------------------------------------------------------------------

async def test_a_member_that_lost_its_partition_cannot_commit_over_the_new_owner(redis, keys):
    tp = TP("src", 0)
    a = Group(redis, keys, "g", "member-a", lease_ms=400, rebalance_ms=300)
    b = Group(redis, keys, "g", "member-b", lease_ms=10_000, rebalance_ms=300)

    joined = await a.join(b"md-a", changed=True)
    assert (await a.sync(joined.round)).status == "lead"
    await a.assign(joined.round, {"member-a": b"asg-a"}, {tp: "member-a"})
    taken = await a.sync(joined.round)
    assert (taken.status, taken.payload) == ("assigned", [b"asg-a"])
    assert await a.commit(taken.generation, {tp: 10}) == set()

    await asyncio.sleep(0.5)  # member a stalls past its lease; b arrives and takes over
    joined_b = await b.join(b"md-b", changed=True)
    led = await b.sync(joined_b.round)
    assert led.status == "lead" and led.payload == [b"member-b", b"md-b"], "the stalled member is still counted"
    await b.assign(joined_b.round, {"member-b": b"asg-b"}, {tp: "member-b"})
    taken_b = await b.sync(joined_b.round)
    assert taken_b.generation == taken.generation + 1

    assert await a.commit(taken.generation, {tp: 20}) == {tp}, "the old owner's commit went through"
    assert await b.committed([tp]) == {tp: 10}
    assert await b.commit(taken_b.generation, {tp: 15}) == set()
    assert await b.committed([tp]) == {tp: 15}
    assert (await a.heartbeat()).status == "evicted"


async def test_a_round_waits_for_every_live_member_and_one_of_them_leads(redis, keys):
    a = Group(redis, keys, "g", "a", lease_ms=10_000, rebalance_ms=10_000)
    b = Group(redis, keys, "g", "b", lease_ms=10_000, rebalance_ms=10_000)
    ra = await a.join(b"ma", changed=False)
    rb = await b.join(b"mb", changed=False)
    assert rb.round == ra.round + 1
    assert (await a.sync(ra.round)).status == "again"  # b's arrival started a new round
    assert (await b.sync(rb.round)).status == "wait"  # a has not joined it yet
    ra = await a.join(b"ma", changed=False)
    assert ra.round == rb.round, "catching up with a round must not start another"
    lead = await b.sync(rb.round)
    assert lead.status == "lead" and sorted(lead.payload[::2]) == [b"a", b"b"]
    assert (await a.sync(ra.round)).status == "wait"  # b leads; a waits for the assignment
    assert (await a.assign(ra.round, {"a": b"x"}, {})).status == "stale", "a non-leader wrote an assignment"
    await b.assign(rb.round, {"a": b"x", "b": b"y"}, {})
    assert (await a.sync(ra.round)).payload == [b"x"]
    await a.leave()
    assert (await b.heartbeat()).round == rb.round + 1, "a clean leave did not start a round at once"


async def test_a_length_capped_topic_is_trimmed_on_append(producer, redis, keys):
    await producer.create_topic("capped", 1, 1, config={"redis.maxlen": 200})
    for i in range(2000):
        await producer.send("capped", None, str(i).encode(), 0, None, None)
    await producer.flush()
    length = await redis.xlen(keys.topic_partition("capped", 0))
    assert 200 <= length < 400, f"{length} entries kept for a cap of 200 (MAXLEN ~ trims whole nodes)"


async def test_a_client_only_app_reads_every_partition_without_joining_the_group(redis_url, keys, redis):
    app = make_app(broker_url(redis_url, keys))
    await app.start_client()
    try:
        await app.consumer.subscribe(["replies"])
        assert app.consumer.assignment() == {TP("replies", p) for p in range(8)}
        await asyncio.sleep(1.5)  # a heartbeat or two
        assert await redis.zrange(keys.group("drivertest", "members"), 0, -1) == []
    finally:
        await app.stop()


async def test_a_seek_to_no_offset_reads_the_partition_from_its_start(redis_url, keys, redis):
    # faust's table recovery seeks a standby partition with None when a rebalance added it
    # after the offsets were built (tables/recovery.py); the worker must not crash on it
    await produce(redis, keys, "counts-changelog", [(b"k", str(i).encode()) for i in range(3)], partitions=1)
    app = make_app(broker_url(redis_url, keys))
    app.client_only = True  # reads every partition without a group: no rebalance in this test
    consumer = app.consumer
    await consumer.transport.acquire()
    try:
        await consumer.subscribe(["counts-changelog"])
        tp = TP("counts-changelog", 0)
        await consumer.seek_wait({tp: None})
        records = await consumer._getmany({tp}, 1.0)
        assert [m.value for m in records[tp]] == [b"0", b"1", b"2"]
    finally:
        await consumer.transport.release()


async def test_a_fetch_that_a_rebalance_overtakes_delivers_nothing_from_the_partitions_taken_away(
        redis_url, keys, redis):
    # the fetch reads positions for a partition new to it while a rebalance takes every partition
    # away (what _rebalance does between revoking and the new assignment): it must neither crash
    # on a position that is gone nor bring a stale one back
    await produce(redis, keys, "src", [(b"k", b"1")], partitions=2)
    await produce(redis, keys, "src", [(b"k1", b"2")], partitions=2)
    app = make_app(broker_url(redis_url, keys))
    app.client_only = True  # every partition, no group: only this consumer's bookkeeping matters
    consumer = app.consumer
    await consumer.transport.acquire()
    try:
        await consumer.subscribe(["src"])
        known, new = TP("src", partition_for(b"k", 2)), TP("src", partition_for(b"k1", 2))
        await consumer.seek_wait({known: 0})
        fetch = asyncio.create_task(consumer._getmany({known, new}, 1.0))
        await asyncio.sleep(0)  # the fetch now waits for the new partition's watermarks
        consumer._forget_assignment()
        assert await fetch == {}
        assert consumer._positions == {}, "a position read before the rebalance came back after it"
    finally:
        await consumer.transport.release()
