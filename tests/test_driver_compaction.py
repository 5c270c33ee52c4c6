"""Log compaction of compacting topics (table changelogs): one entry per key, the latest,
written by the append script itself; a worker recovers its table exactly from it."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import faust
import pytest

from streams.codec import decode_record, encode_record
from streams.connection import AnyRedis
from streams.driver.topics import Topics
from streams.keys import Keys
from streams.log import PartitionLog
from tests.driver_harness import WorkerProcess, broker_url, probe_table, produce, wait_until
from tests.topic_reads import bounds, read_entries

APP = "tabletest"
CHANGELOG = f"{APP}-latest-changelog"


async def kept(client: AnyRedis, keys: Keys, topic: str, partition: int) -> list[tuple[int, bytes | None, bytes | None]]:
    """(offset, key, value) of every entry a partition holds."""
    entries = await read_entries(client, keys, topic, partition, 0, 1_000_000)
    return [(r.offset, r.key, r.value) for r in (decode_record(*e) for e in entries)]


def updates(n: int, nkeys: int, seed: int = 7) -> list[tuple[bytes | None, bytes | None]]:
    """n records over nkeys keys in random order, every 50th a delete (value None)."""
    rng = random.Random(seed)
    return [(f"k{rng.randrange(nkeys)}".encode(), None if i % 50 == 49 else f"v{i}".encode()) for i in range(n)]


async def test_a_compacting_partition_keeps_exactly_the_latest_entry_of_each_key(redis, keys):
    records = updates(3000, 17)
    records[10:10] = [(None, b"unkeyed-1"), (b"k3", b"twice-a"), (b"k3", b"twice-b"), (None, b"unkeyed-2")]
    compacted = PartitionLog(redis, keys, "cl", compacting=True)
    plain = PartitionLog(redis, keys, "plain")
    for start in range(0, len(records), 250):  # several calls, and a key repeated inside one
        batch = [encode_record(k, v) for k, v in records[start:start + 250]]
        await compacted.append(0, batch)
        await plain.append(0, batch)

    last: dict[bytes, tuple[int, bytes | None]] = {}
    for offset, (key, value) in enumerate(records):
        if key is not None:
            last[key] = (offset, value)
    unkeyed = [(offset, None, value) for offset, (key, value) in enumerate(records) if key is None]
    expected = sorted([(offset, key, value) for key, (offset, value) in last.items()] + unkeyed)
    assert await kept(redis, keys, "cl", 0) == expected
    assert any(value is None for _, _, value in expected)  # a tombstone stays as its key's latest
    assert await redis.xlen(keys.topic_partition("cl", 0)) == 17 + 2
    assert await bounds(redis, keys, "cl", 0) == (expected[0][0], len(records))
    stored = await redis.hgetall(keys.topic_compaction("cl", 0))
    assert {k: int(v) for k, v in stored.items()} == {k: offset for k, (offset, _v) in last.items()}
    # the same records on a topic that does not compact: every one kept, no hash
    assert await redis.xlen(keys.topic_partition("plain", 0)) == len(records)
    assert not await redis.exists(keys.topic_compaction("plain", 0))


async def test_a_partition_started_again_from_zero_forgets_the_offsets_of_its_old_entries(redis, keys):
    log = PartitionLog(redis, keys, "cl", compacting=True)
    await log.append(0, [encode_record(b"old", b"1")] + [encode_record(b"x", b"2")] * 3)
    await redis.delete(keys.topic_partition("cl", 0), keys.topic_sequence("cl", 0))  # cleared by hand
    await log.append(0, [encode_record(b"a", b"1"), encode_record(b"b", b"1"), encode_record(b"old", b"2")])
    # the hash said old -> 0: kept, it would delete a's new entry at offset 0
    assert await kept(redis, keys, "cl", 0) == [(0, b"a", b"1"), (1, b"b", b"1"), (2, b"old", b"2")]


async def test_compacting_is_recorded_by_the_declaration_that_says_so(redis, keys):
    topics = Topics(redis, keys, default_partitions=4)
    # a subscription or a first send declares a changelog before its table does
    assert not (await topics.ensure(["app-t-changelog"]))["app-t-changelog"].compacting
    declared = await topics.create("app-t-changelog", 4, compacting=True)
    plain = await topics.create("plain", 4, compacting=False)
    again = await Topics(redis, keys, default_partitions=4).create("plain", 4, compacting=True)
    assert (declared.compacting, plain.compacting, again.compacting) == (True, False, False)
    assert await redis.hget(keys.topic_meta("app-t-changelog"), "compacting") == b"1"


@pytest.fixture
async def app(redis_url: str, keys: Keys, redis: AnyRedis) -> AsyncIterator[faust.App]:
    app = faust.App("compacttest", broker=broker_url(redis_url, keys), web_enabled=False, topic_partitions=2)
    await app.producer.start()
    try:
        yield app
    finally:
        await app.producer.stop()


async def test_the_producer_compacts_a_topic_faust_declares_compacting(app, redis, keys):
    topic = app.topic("compacttest-t-changelog", partitions=2, compacting=True, key_type=bytes, value_type=bytes,
                      key_serializer="raw", value_serializer="raw")
    await topic.declare()
    sent = [await app.producer.send_and_wait(topic.get_topic_name(), f"k{i % 5}".encode(), str(i).encode(), None,
                                             None, None) for i in range(400)]
    assert max(m.offset for m in sent if m.partition == 0) + max(m.offset for m in sent if m.partition == 1) + 2 == 400
    entries = [await kept(redis, keys, "compacttest-t-changelog", p) for p in range(2)]
    assert sorted((k, v) for part in entries for _o, k, v in part) == \
        sorted((f"k{i}".encode(), str(395 + i).encode()) for i in range(5))


# --- a worker's table ------------------------------------------------------------------------

async def changelog_state(client: AnyRedis, keys: Keys) -> tuple[int, int]:
    """(records ever written, entries kept) over the changelog's 8 partitions."""
    written = held = 0
    for p in range(8):
        written += (await bounds(client, keys, CHANGELOG, p))[1]
        held += await client.xlen(keys.topic_partition(CHANGELOG, p))
    return written, held


async def test_a_restarted_worker_recovers_its_table_exactly_from_the_compacted_changelog(
        redis_url, redis, keys, tmp_path: Path):
    records = updates(6000, 40)
    writes = [(k, v if v is not None else b"del") for k, v in records if k is not None]
    table: dict[str, str] = {}
    for k, v in writes:
        if v == b"del":
            table.pop(k.decode(), None)
        else:
            table[k.decode()] = v.decode()
    touched = {k for k, v in writes if v != b"del"}  # keys the changelog has an entry for
    # a delete of a key the table does not hold writes no tombstone (faust's pop of a missing key)
    changelog_writes = 0
    state: dict[bytes, bool] = {}
    for k, v in writes:
        if v == b"del":
            changelog_writes += state.get(k, False)
            state[k] = False
        else:
            changelog_writes += 1
            state[k] = True
    assert 0 < len(table) < len(touched)  # some keys end deleted

    url = broker_url(redis_url, keys)
    first = WorkerProcess(url, tmp_path, "first", module="tests.driver_table_app").start()
    try:
        await produce(redis, keys, "writes", writes)

        async def all_written() -> bool:
            return (await changelog_state(redis, keys))[0] == changelog_writes
        await wait_until(all_written, 90, "the changelog did not get every table write", [first])
        assert await probe_table(redis, keys, timeout=30) == table
    finally:
        assert first.stop() == 0
    assert await changelog_state(redis, keys) == (changelog_writes, len(touched))

    second = WorkerProcess(url, tmp_path, "second", module="tests.driver_table_app").start()
    try:
        recovered = await probe_table(redis, keys, timeout=90)
        assert "Recovery" in second.log() or "recovery" in second.log()
    finally:
        assert second.stop() == 0
    assert recovered == table
    assert await changelog_state(redis, keys) == (changelog_writes, len(touched))  # recovery wrote nothing
