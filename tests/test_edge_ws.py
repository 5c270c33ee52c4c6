"""The edge's WebSocket protocol against real Redis (and PostgreSQL for the archive)."""

import asyncio
import json
import signal
import time
import uuid
from contextlib import asynccontextmanager

import aiohttp
import pytest

from schemas.messages import Connected, PriceUpdate, Subscribed
from streams.archive import ArchiveStore
from streams.events import EventLog
from streams.pg import create_pool, upgrade
from tests.edge_harness import EdgeProcess, edge_settings, running_edge, ws_client
from tests.factories import price_changes, signal_change


class Feeder:
    """Appends events to a strategy in the background, like the join agent would."""

    def __init__(self, log, strategy="volume_wave", per_batch=5, pause=0.01):
        self.log, self.strategy, self.per_batch, self.pause = log, strategy, per_batch, pause
        self.ids: list[str] = []
        self.offset = 10_000
        self.task = None

    async def once(self, n):
        ids = await self.log.append_events(self.strategy, price_changes(n, self.strategy, start=self.offset))
        self.offset += n
        self.ids += ids
        return ids

    async def _run(self):
        while not self.stopping:
            await self.once(self.per_batch)
            await asyncio.sleep(self.pause)

    def start(self):
        self.stopping = False
        self.task = asyncio.create_task(self._run())

    async def stop(self):
        # redis-py can swallow a cancellation that lands in a command (it becomes a connection
        # error, retried): the flag ends the loop whatever the cancel did
        self.stopping = True
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass


@asynccontextmanager
async def live_subscriber(base, target="volume_wave"):
    """A client subscribed to `target` whose snapshot has arrived: live from here on."""
    async with ws_client(base) as c:
        await c.next()
        await c.send({"type": "subscribe", "target": target})
        await c.next(type="price_update")
        yield c


async def collect_until(client, predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("timed out collecting frames")
        await client.next(timeout=deadline - time.monotonic())


@pytest.fixture
async def edge(redis_url, keys, redis):
    async with running_edge(edge_settings(redis_url, keys)) as base:
        yield base


# --- the old mobile client's exact frames ----------------------------------------------------

async def test_old_client_strategy_subscription_gets_the_old_fields(edge, redis, keys):
    log = EventLog(redis, keys)
    await log.append_events("volume_wave", price_changes(6))
    async with ws_client(edge) as c:
        hello = await c.next()
        Connected.model_validate(hello)
        assert hello["type"] == "connected" and hello["client_id"]
        await c.send('{"type":"subscribe","subscription_type":"strategy","target":"volume_wave"}')
        sub = Subscribed.model_validate(await c.next(type="subscribed"))
        assert sub.target == "volume_wave" and sub.recovered is False
        snap = await c.next(type="price_update")
        PriceUpdate.model_validate(snap)
        assert snap["snapshot"] is True and snap["count"] == 3 == len(snap["data"])
        row = snap["data"][0]
        assert {"code", "name", "price", "change", "change_percent", "volume", "timestamp"} <= row.keys()
        assert len(row["code"]) == 6 and row["code"].isdigit()
        live = await log.append_events("volume_wave", price_changes(2, start=6))
        await collect_until(c, lambda: c.event_ids() == live)


async def test_old_client_stock_subscription_with_a_bare_code(edge, redis, keys):
    from agents.ingest import TickWriter
    from tests.factories import raw_tick as raw

    async with ws_client(edge) as c:
        await c.next()
        await c.send('{"type":"subscribe","subscription_type":"stock","target":"600519"}')
        sub = await c.next(type="subscribed")
        assert sub["subscription_type"] == "stock" and sub["target"] == "600519"
        writer = TickWriter(redis, keys, partitions=8, source="test")
        # no pause: the tail reads from the partition's newest entry at subscribe time, not "$"
        await writer.write([raw("600519.SH", 1520.0), raw("000001.SZ", 11.3, pre_close=11.2, name="平安银行")])
        upd = await c.next(type="price_update")
        assert upd["target"] == "600519" and [r["code"] for r in upd["data"]] == ["600519"]
        assert upd["data"][0]["price"] == 1520.0 and upd["data"][0]["change_percent"] == pytest.approx(1.3333, abs=1e-3)


async def test_old_client_pings_every_30s_get_pongs(edge):
    async with ws_client(edge) as c:
        await c.next()
        for _ in range(3):  # the old client's 30 s timer, compressed
            await c.send('{"type":"ping"}')
            assert (await c.next())["type"] == "pong"


async def test_server_closes_a_client_silent_past_the_heartbeat(redis_url, keys, redis):
    async with running_edge(edge_settings(redis_url, keys, edge_heartbeat_s=0.4)) as base:
        async with aiohttp.ClientSession() as s:
            # autoping off: this client never answers the server's pings
            async with s.ws_connect(base + "/ws", autoping=False) as ws:
                started = time.monotonic()
                while True:
                    msg = await ws.receive(timeout=5)
                    if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                        break
                assert time.monotonic() - started < 3


# --- resume --------------------------------------------------------------------------------

async def test_resume_across_a_disconnect_is_gapless_and_duplicate_free(edge, redis, keys):
    log = EventLog(redis, keys)
    feeder = Feeder(log)
    await feeder.once(10)
    feeder.start()
    try:
        seen: list[str] = []
        last, epoch = None, None
        for _round in range(4):
            async with ws_client(edge) as c:
                await c.next()
                msg = {"type": "subscribe", "subscription_type": "strategy", "target": "volume_wave"}
                if last:
                    msg |= {"last_event_id": last, "epoch": epoch}
                await c.send(msg)
                sub = await c.next(type="subscribed")
                if last:
                    assert sub["recovered"] is True
                epoch = sub["epoch"]
                await collect_until(c, lambda: len(c.event_ids()) >= 40)
                ids = c.event_ids()
                seen += ids
                last = seen[-1]
            await asyncio.sleep(0.15)  # disconnected while events keep flowing
    finally:
        await feeder.stop()
    start = feeder.ids.index(seen[0])
    assert seen == feeder.ids[start:start + len(seen)], "gap or duplicate across reconnects"


async def test_resume_past_redis_retention_comes_from_the_archive(redis_url, keys, redis, pg_url):
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    store = ArchiveStore(pool)
    log = EventLog(redis, keys, maxlen=200, archive_group=None)  # archived by hand below
    ids = []
    for start in range(0, 2000, 100):
        got = await log.append_events("volume_wave", price_changes(100, start=start))
        ids += got
        await store.write("volume_wave", await log.epoch("volume_wave"), await log.read_after("volume_wave", ids[-101] if len(ids) > 100 else None))
    await pool.close()
    assert await log.first_id("volume_wave") != ids[0]
    epoch = await log.epoch("volume_wave")
    async with running_edge(edge_settings(redis_url, keys, database_url=pg_url)) as base:
        async with ws_client(base) as c:
            await c.next()
            await c.send({"type": "subscribe", "target": "volume_wave", "last_event_id": ids[99], "epoch": epoch})
            sub = await c.next(type="subscribed")
            assert sub["recovered"] is True and sub["replayed"] == 1900
            await collect_until(c, lambda: len(c.event_ids()) >= 1900)
            assert c.event_ids() == ids[100:]


async def test_an_unknown_epoch_gives_recovered_false_and_a_snapshot(edge, redis, keys):
    log = EventLog(redis, keys)
    ids = await log.append_events("volume_wave", price_changes(9))
    async with ws_client(edge) as c:
        await c.next()
        await c.send({"type": "subscribe", "target": "volume_wave", "last_event_id": ids[2], "epoch": "not-this-one"})
        sub = await c.next(type="subscribed")
        assert sub["recovered"] is False and sub["epoch"] == await log.epoch("volume_wave")
        snap = await c.next(type="price_update")
        assert snap["snapshot"] is True and snap["count"] == 3


async def test_more_missed_events_than_the_replay_cap_gives_a_snapshot(redis_url, keys, redis):
    log = EventLog(redis, keys)
    ids = await log.append_events("volume_wave", price_changes(50))
    async with running_edge(edge_settings(redis_url, keys, edge_max_replay=10)) as base:
        async with ws_client(base) as c:
            await c.next()
            await c.send({"type": "subscribe", "target": "volume_wave", "last_event_id": ids[0]})
            assert (await c.next(type="subscribed"))["recovered"] is False
            assert (await c.next(type="price_update"))["snapshot"] is True


async def test_signal_updates_pass_through_as_their_own_message(edge, redis, keys):
    log = EventLog(redis, keys)
    await log.append_events("volume_wave", price_changes(3))
    async with ws_client(edge) as c:
        await c.next()
        await c.send({"type": "subscribe", "target": "volume_wave"})
        await c.next(type="price_update")
        await log.append_events("volume_wave", [signal_change("remove", ts_code="000001.SZ")])
        upd = await c.next(type="signal_update")
        assert upd["action"] == "remove" and upd["data"][0]["ts_code"] == "000001.SZ" and upd["count"] == 1


async def test_killing_an_edge_node_and_reconnecting_to_another_loses_nothing(redis_url, keys, redis):
    log = EventLog(redis, keys)
    feeder = Feeder(log)
    await feeder.once(5)
    a, b = EdgeProcess(redis_url, keys, "node-a"), EdgeProcess(redis_url, keys, "node-b")
    try:
        await a.ready()
        await b.ready()
        feeder.start()
        async with ws_client(a.base) as c:
            await c.next()
            await c.send({"type": "subscribe", "target": "volume_wave"})
            sub = await c.next(type="subscribed")
            await collect_until(c, lambda: len(c.event_ids()) >= 30)
            first_part = c.event_ids()
            a.kill()
            # drain what was already on the wire before the node died
            try:
                while True:
                    msg = await c.ws.receive(timeout=2)
                    if msg.type != aiohttp.WSMsgType.TEXT:
                        break
                    c.frames.append(json.loads(msg.data))
            except asyncio.TimeoutError:
                pass
            first_part = c.event_ids()
        async with ws_client(b.base) as c2:
            await c2.next()
            await c2.send({"type": "subscribe", "target": "volume_wave", "last_event_id": first_part[-1],
                           "epoch": sub["epoch"]})
            assert (await c2.next(type="subscribed"))["recovered"] is True
            await collect_until(c2, lambda: len(c2.event_ids()) >= 30)
            seen = first_part + c2.event_ids()
    finally:
        await feeder.stop()
        for node in (a, b):
            if node.proc.poll() is None:
                node.kill()
    # against the stream itself: an append whose reply the cancelled feeder never read is in
    # the stream (and was pushed) without being in feeder.ids
    stream = [eid.decode() for eid, _ in await redis.xrange(keys.events("volume_wave"))]
    start = stream.index(seen[0])
    assert seen == stream[start:start + len(seen)]


async def test_a_replay_larger_than_the_send_queue_arrives_whole(redis_url, keys, redis):
    log = EventLog(redis, keys)
    first = await log.append_events("volume_wave", price_changes(1))
    ids = []
    for start in range(1, 3001, 500):
        ids += await log.append_events("volume_wave", price_changes(500, start=start))
    # 3,000 events are several times this queue: they must come by backpressure, not conflation
    async with running_edge(edge_settings(redis_url, keys, edge_send_queue_bytes=65536)) as base:
        async with ws_client(base) as c:
            await c.next()
            await c.send({"type": "subscribe", "target": "volume_wave", "last_event_id": first[0]})
            assert (await c.next(type="subscribed"))["replayed"] == 3000
            await collect_until(c, lambda: len(c.event_ids()) >= 3000)
            assert c.event_ids() == ids


async def test_market_subscriptions_are_served_from_the_market_stream(edge, redis, keys):
    from tests.test_edge_market import breadth

    log = EventLog(redis, keys)
    (eid,) = await log.append_events("market", [breadth(1)])
    async with ws_client(edge) as c:
        await c.next()
        await c.send({"type": "subscribe", "subscription_type": "market", "target": "all"})
        assert (await c.next(type="subscribed"))["target"] == "market"
        assert (await c.next(type="market_update"))["event_id"] == eid


async def test_a_restarted_node_resumes_its_consumer_group_where_it_stopped(redis_url, keys, redis):
    from edge import metrics

    log = EventLog(redis, keys)
    await log.append_events("volume_wave", price_changes(1))
    settings = edge_settings(redis_url, keys, edge_node="steady-node")
    async with running_edge(settings) as base:
        async with live_subscriber(base) as c:
            seen = await log.append_events("volume_wave", price_changes(5, start=1))
            await collect_until(c, lambda: c.event_ids() == seen)
    missed = await log.append_events("volume_wave", price_changes(7, start=6))  # while the node is down
    read_before = metrics.EVENTS_READ.labels("volume_wave")._value.get()
    async with running_edge(settings) as base:
        async with ws_client(base) as c:
            await c.next()
            await c.send({"type": "subscribe", "target": "volume_wave", "last_event_id": seen[-1]})
            assert (await c.next(type="subscribed"))["replayed"] == 7
            await collect_until(c, lambda: c.event_ids() == missed)
            groups = {g["name"]: g for g in await redis.xinfo_groups(keys.events("volume_wave"))}
            deadline = asyncio.get_running_loop().time() + 5
            while groups[b"edge:steady-node"]["last-delivered-id"].decode() != missed[-1]:
                assert asyncio.get_running_loop().time() < deadline, "group did not catch up"
                await asyncio.sleep(0.05)
                groups = {g["name"]: g for g in await redis.xinfo_groups(keys.events("volume_wave"))}
    # the same group went on from where it stopped: it read the 7 missed events, not the 6 before
    assert metrics.EVENTS_READ.labels("volume_wave")._value.get() - read_before == 7
    # no second edge group (the archive group comes with the stream: append_events makes it)
    assert set(groups) == {b"edge:steady-node", b"archiver"}


async def test_events_both_replayed_and_read_live_are_sent_once(redis_url, keys, redis):
    log = EventLog(redis, keys)
    await log.append_events("volume_wave", price_changes(1))
    settings = edge_settings(redis_url, keys, edge_node="overlap-node")
    async with running_edge(settings) as base:
        async with live_subscriber(base):
            pass
        await asyncio.sleep(0.1)  # A left: the tail stopped, its group stays behind
        backlog = []
        for start in range(1, 301, 50):  # the group's backlog, which the next resume also replays
            backlog += await log.append_events("volume_wave", price_changes(50, start=start))
        async with ws_client(base) as b:
            await b.next()
            first = await log.first_id("volume_wave")
            await b.send({"type": "subscribe", "target": "volume_wave", "last_event_id": first})
            assert (await b.next(type="subscribed"))["replayed"] == 300
            live = await log.append_events("volume_wave", price_changes(5, start=301))
            await collect_until(b, lambda: live[-1] in b.event_ids())
            await b.drain()  # anything sent twice would arrive by now
            assert b.event_ids() == backlog + live


async def test_the_edge_survives_a_redis_restart_and_keeps_pushing(keys):
    from streams.connection import connect
    from tickwave import servers

    own = servers.start_redis()
    try:
        client = connect(own.url)
        log = EventLog(client, keys)
        await log.append_events("volume_wave", price_changes(3))
        async with running_edge(edge_settings(own.url, keys)) as base:
            async with live_subscriber(base) as c:
                own.stop()  # Redis goes away, and comes back empty (no persistence)
                await asyncio.sleep(1.0)
                own = servers.EmbeddedRedis(own.binary, port=own.port).start()
                after = []
                deadline = asyncio.get_running_loop().time() + 20
                # the stream is new: a new epoch, and the node's tail recreates its group
                while not after or after[-1] not in c.event_ids():
                    assert asyncio.get_running_loop().time() < deadline, "no events pushed after the restart"
                    after += await log.append_events("volume_wave", price_changes(2, start=len(after) * 10))
                    await c.drain(quiet=0.5)
                upd = [f for f in c.frames if f["type"] == "price_update" and not f.get("snapshot")][-1]
                assert upd["epoch"] == await log.epoch("volume_wave")
        await client.aclose()
    finally:
        own.stop()


async def test_a_subscribe_while_redis_is_down_gets_an_error_and_the_connection_stays(keys):
    from tickwave import servers

    own = servers.start_redis()
    try:
        async with running_edge(edge_settings(own.url, keys)) as base:
            async with ws_client(base) as c:
                await c.next()
                own.stop()
                await c.send({"type": "subscribe", "target": "volume_wave", "id": 3})
                err = await c.next(type="error", timeout=15)
                assert err["code"] == "unavailable" and err["id"] == 3
                await c.send('{"type":"ping"}')
                assert (await c.next(type="pong"))["type"] == "pong"
    finally:
        own.stop()


async def test_a_stock_tail_reads_the_stored_partition_count_of_the_ticks_topic(redis_url, keys, redis):
    from agents.ingest import TickWriter
    from streams.partition import partition_for
    from streams.topics import declare
    from tests.factories import raw_tick as raw

    # a topic created with 3 partitions while this edge's setting says 8: the stored count wins
    code = next(c for c in ("600519.SH", "000001.SZ", "300750.SZ", "601318.SH")
                if partition_for(c, 3) != partition_for(c, 8))
    await declare(redis, keys, ["ticks"], partitions=3)
    async with running_edge(edge_settings(redis_url, keys, tick_partitions=8)) as base:
        async with ws_client(base) as c:
            await c.next()
            await c.send({"type": "subscribe", "subscription_type": "stock", "target": code})
            await c.next(type="subscribed")
            await TickWriter(redis, keys, partitions=3, source="test").write([raw(code, 1520.0)])
            upd = await c.next(type="price_update")
            assert [(r["ts_code"], r["price"]) for r in upd["data"]] == [(code, 1520.0)]


async def test_a_new_tail_is_read_at_once_not_after_the_blocked_read_times_out(edge, redis, keys):
    from edge.reader import BLOCK_MS

    log = EventLog(redis, keys)
    for name in ("first", "second"):
        await log.append_events(name, price_changes(1, name))
    async with live_subscriber(edge, "first"):
        await asyncio.sleep(0.1)  # the node's one read is now blocked on `first` alone
        async with live_subscriber(edge, "second") as c:
            t = time.monotonic()
            ids = await log.append_events("second", price_changes(1, "second", start=1))
            await collect_until(c, lambda: c.event_ids() == ids)
            assert time.monotonic() - t < BLOCK_MS / 1000 / 4, "the read naming `second` waited out the block"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_stopping_edge_closes_every_client_with_1001_within_1s_and_exits_within_5s(
        redis_url, keys, redis, signum):
    log = EventLog(redis, keys)
    await log.append_events("volume_wave", price_changes(3))
    node = EdgeProcess(redis_url, keys, f"stop-{uuid.uuid4().hex[:8]}")
    try:
        await node.ready()
        async with aiohttp.ClientSession() as s:
            sockets = [await s.ws_connect(node.base + "/ws") for _ in range(50)]
            for ws in sockets:
                assert (await ws.receive_json(timeout=5))["type"] == "connected"
                await ws.send_json({"type": "subscribe", "target": "volume_wave"})
            for ws in sockets:
                while (await ws.receive_json(timeout=5))["type"] != "price_update":
                    pass

            async def close_of(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, float]:
                while True:
                    msg = await ws.receive(timeout=10)
                    if msg.type == aiohttp.WSMsgType.CLOSE:
                        return msg.data, time.monotonic()
                    if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        return ws.close_code, time.monotonic()

            closes = [asyncio.create_task(close_of(ws)) for ws in sockets]
            feeder = Feeder(log)
            feeder.start()  # events keep flowing while it stops
            await asyncio.sleep(0.2)
            sent = time.monotonic()
            node.proc.send_signal(signum)
            got = await asyncio.gather(*closes)
            await feeder.stop()
            code = await asyncio.to_thread(node.proc.wait, 10)
            exited = time.monotonic() - sent
    finally:
        if node.proc.poll() is None:
            node.kill()
    assert [c for c, _ in got] == [1001] * 50
    slowest = max(t for _, t in got) - sent
    assert slowest < 1.0, f"the last client heard 1001 after {slowest:.2f}s"
    assert code == 0 and exited < 5.0, f"exit code {code} after {exited:.2f}s"


async def test_a_stream_recreated_among_several_gets_a_new_group_and_the_others_go_on(edge, redis, keys):
    log = EventLog(redis, keys)
    names = ("steady", "reborn")
    for name in names:
        await log.append_events(name, price_changes(1, name))
    async with ws_client(edge) as c:
        await c.next()
        for name in names:
            await c.send({"type": "subscribe", "target": name})
            await c.next(type="price_update")
        sent = {name: await log.append_events(name, price_changes(2, name, start=1)) for name in names}
        await collect_until(c, lambda: all(c.event_ids(n) == sent[n] for n in names))
        old_epoch = await log.epoch("reborn")
        # deleted and recreated under a read naming both streams: Redis answers NOGROUP for the read
        await redis.delete(keys.events("reborn"), keys.epoch("reborn"), keys.snapshot("reborn"), keys.positions("reborn"))
        sent["reborn"] += await log.append_events("reborn", price_changes(2, "reborn"))
        sent["steady"] += await log.append_events("steady", price_changes(2, "steady", start=3))
        await collect_until(c, lambda: all(c.event_ids(n) == sent[n] for n in names))
        await c.drain()
        assert {n: c.event_ids(n) for n in names} == sent
        new_epoch = await log.epoch("reborn")
        assert new_epoch != old_epoch
        last = [f for f in c.frames if f["type"] == "price_update" and f["target"] == "reborn"][-1]
        assert last["epoch"] == new_epoch
