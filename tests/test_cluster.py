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


async def test_the_edge_follows_strategies_and_ticks_on_different_slots_under_redis_cluster(cluster_url, keys):
    from redis.asyncio.cluster import RedisCluster

    from agents.ingest import TickWriter
    from tests.edge_harness import edge_settings, running_edge, ws_client
    from tests.factories import raw_tick

    client = connect(cluster_url)
    try:
        assert isinstance(client, RedisCluster)
        log = EventLog(client, keys)
        names = ["volume_wave", "breakout", "gap_up", "limit_up"]
        assert len({client.keyslot(keys.events(n)) for n in names}) == len(names)  # a multi-key read would fail
        for name in names:
            await log.append_events(name, price_changes(1, name))
        async with running_edge(edge_settings(cluster_url, keys, edge_cluster_poll_ms=10)) as base:
            async with ws_client(base) as c:
                await c.next()
                for name in names:
                    await c.send({"type": "subscribe", "target": name})
                    await c.next(type="subscribed")
                await c.send({"type": "subscribe", "subscription_type": "stock", "target": "000001.SZ"})
                await c.next(type="subscribed")
                appended = {}
                for start in (1, 3):
                    for name in names:
                        appended.setdefault(name, []).extend(
                            await log.append_events(name, price_changes(2, name, start=start)))

                def rows(target=None):
                    return [(f["target"], r["event_id"]) for f in c.frames if f["type"] == "price_update"
                            and not f["snapshot"] and (target is None or f["target"] == target) for r in f["data"]]

                want = sorted((n, i) for n, ids in appended.items() for i in ids)
                while len(rows()) < len(want):
                    await c.next(timeout=10)
                # one stream deleted and recreated: its group is gone, the others' are not
                old_epoch = await log.epoch("gap_up")
                for key in (keys.events("gap_up"), keys.epoch("gap_up"), keys.snapshot("gap_up"),
                            keys.positions("gap_up")):
                    await client.delete(key)
                reborn = await log.append_events("gap_up", price_changes(2, "gap_up"))
                more = await log.append_events("breakout", price_changes(1, "breakout", start=5))
                await TickWriter(client, keys, partitions=8, source="test").write(
                    [raw_tick("000001.SZ", 11.3, pre_close=11.2, name="平安银行")])
                want += [("gap_up", i) for i in reborn] + [("breakout", i) for i in more]
                while len(rows()) < len(want) + 1:
                    await c.next(timeout=10)
                await c.drain(quiet=0.3)
                assert sorted(rows()) == sorted(want + rows("000001.SZ"))
                assert [(r["ts_code"], r["price"]) for f in c.frames if f["type"] == "price_update"
                        and f["target"] == "000001.SZ" for r in f["data"]] == [("000001.SZ", 11.3)]
                new_epoch = await log.epoch("gap_up")
                assert new_epoch != old_epoch
                assert {f["epoch"] for f in c.frames if f["type"] == "price_update" and f["target"] == "gap_up"
                        and f["data"] and f["data"][0]["event_id"] in reborn} == {new_epoch}
    finally:
        found = [k async for k in client.scan_iter(match=f"{keys.prefix}*")]
        for k in found:
            await client.delete(k)
        await client.aclose()
