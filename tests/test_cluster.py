"""Every multi-key script runs on one slot: the event append and the partition log under Redis Cluster."""

from streams.codec import encode_record
from streams.connection import connect
from streams.events import EventLog
from streams.log import PartitionLog
from tests.factories import price_changes
from tests.topic_reads import bounds


async def test_append_events_and_reads_work_under_redis_cluster(cluster_url, keys):
    client = connect(cluster_url)
    try:
        log = EventLog(client, keys)
        ids = await log.append_events("volume_wave", price_changes(10))
        assert await log.append_events("volume_wave", price_changes(10)) == []  # dedup still holds
        await log.append_events("breakout", price_changes(3, "breakout"))
        assert [s.id for s in await log.read_after("volume_wave", None)] == ids
        assert len(await log.snapshot("volume_wave")) == 3
        assert await log.strategies() == ["breakout", "volume_wave"]
        assert await log.epoch("volume_wave")
    finally:
        await client.aclose()


async def test_partition_log_appends_across_slots_under_redis_cluster(cluster_url, keys):
    client = connect(cluster_url)
    try:
        log = PartitionLog(client, keys, "ticks")
        first = await log.append_many({p: [encode_record(b"k", b"v")] * 3 for p in range(8)})
        assert first == {p: 0 for p in range(8)}
        assert [await bounds(client, keys, "ticks", p) for p in range(8)] == [(0, 3)] * 8
    finally:
        await client.aclose()
