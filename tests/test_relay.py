"""The signals relay: every outbox row in the `signals` topic exactly once, in commit order,
across SIGKILLs, with two relays at once and with an old leader still appending; NOTIFY wakes
it, polling covers a lost NOTIFY. Every check compares the whole topic with the whole outbox."""

import asyncio
import random
import time
from contextlib import asynccontextmanager

import asyncpg
import pytest

from agents.relay import APPLICATION_NAME, Relay, RelayError, TopicWriter
from schemas.events import SignalChange
from streams.errors import OffsetConflict, SignalNotFound
from streams.pg import create_pool, upgrade
from streams.signals import OutboxRow, SignalStore
from streams.topics import declare
from tests.driver_harness import wait_until
from tests.signals_harness import (
    PARTITIONS,
    RelayProcess,
    assert_topic_is_the_outbox,
    codes,
    outbox,
    script,
    sig,
    sql,
    topic_count,
)


@pytest.fixture
async def store(pg_url):
    await upgrade(pg_url)
    pool = await create_pool(pg_url, max_size=10)
    yield SignalStore(pool)
    await pool.close()


@asynccontextmanager
async def relaying(redis, keys, pg_url, **options):
    """A Relay running as a task of this test."""
    relay = Relay(redis, keys, pg_url, tick_partitions=PARTITIONS, **{"poll_s": 0.2, "standby_s": 0.05, **options})
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield relay
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def fill(store, n, start=0, per_transaction=500):
    for at in range(start, start + n, per_transaction):
        await store.import_signals([sig(c, price=10 + i / 100) for i, c in enumerate(codes(min(per_transaction, start + n - at), at))])


def holds(condition):
    """`condition` as the awaitable check `wait_until` polls."""
    async def check():
        return condition()
    return check


async def all_relayed(redis, keys, pg_url):
    return await topic_count(redis, keys) == len(await outbox(pg_url))


async def relayed_marks(pg_url):
    return (await sql(pg_url, "SELECT count(*) AS n FROM signal_outbox WHERE relayed_at IS NOT NULL"))[0]["n"]


# --- commit order -----------------------------------------------------------------------

async def test_rows_reach_the_topic_in_commit_order_with_concurrent_writers(redis, keys, pg_url, store):
    # every writer sleeps a random while between taking its outbox ids and committing: without
    # ids in commit order, the relay would read a later id, move past an earlier one and lose it
    await script(pg_url, """
        CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN PERFORM pg_sleep(random() * 0.02); RETURN NULL; END $$;
        CREATE TRIGGER slow_commit AFTER INSERT ON signal_outbox FOR EACH STATEMENT EXECUTE FUNCTION slow_commit();
    """)
    universe = codes(40)

    async def writer(seed):
        rng = random.Random(seed)
        for _ in range(30):
            code = rng.choice(universe)
            try:
                if rng.random() < 0.3:
                    await store.remove("volume_wave", code)
                else:
                    await store.add(sig(code, price=round(rng.uniform(5, 50), 2)))
            except SignalNotFound:
                pass

    async with relaying(redis, keys, pg_url, poll_s=0.02) as relay:
        await asyncio.gather(*(writer(i) for i in range(6)))
        last = (await outbox(pg_url))[-1].id
        await wait_until(holds(lambda: relay.stats.last_id >= last), 20, "the relay to reach the last row")
    assert await assert_topic_is_the_outbox(redis, keys, pg_url) > 120


# --- kills and restarts -----------------------------------------------------------------

async def test_a_relay_killed_mid_batch_and_restarted_leaves_every_row_once_in_order(
        redis, redis_url, keys, pg_url, store, tmp_path):
    await fill(store, 4000)
    relay = RelayProcess(redis_url, pg_url, keys, tmp_path, "relay", TICKWAVE_RELAY_BATCH="300")
    rng = random.Random(5)
    kills, mid_batch, before = [], 0, 0
    for round_ in range(4):
        await fill(store, 200, start=4000 + 200 * round_, per_transaction=50)  # writers keep writing
        total = len(await outbox(pg_url))
        target = before + rng.randint(150, 700)
        relay.start()
        deadline = time.monotonic() + 20
        while await topic_count(redis, keys) < target:  # tight: it moves a few rows per millisecond
            assert time.monotonic() < deadline, f"relay moved no rows past {before}:\n{relay.log()[-3000:]}"
            await asyncio.sleep(0.002)
        relay.kill()
        now, marked = await topic_count(redis, keys), await relayed_marks(pg_url)
        assert before < now < total, f"killed while it had rows to move ({before} < {now} < {total})"
        mid_batch += marked < now  # appended rows not yet marked: the kill came inside a batch
        kills.append((now, marked))
        before = now
    assert mid_batch >= 1, f"no kill landed inside a batch: (topic, marked) at each kill {kills}"
    relay.start()
    await wait_until(lambda: all_relayed(redis, keys, pg_url), 30, "the restarted relay to finish", [relay])
    await asyncio.sleep(0.5)  # and nothing more comes
    assert relay.stop() == 0
    assert await assert_topic_is_the_outbox(redis, keys, pg_url) == 4800
    assert relay.terms() == 5


async def test_two_relays_at_once_with_leaders_killed_relay_every_row_once_in_order(
        redis, redis_url, keys, pg_url, store, tmp_path):
    relays = {n: RelayProcess(redis_url, pg_url, keys, tmp_path, n, TICKWAVE_RELAY_BATCH="50").start() for n in "ab"}
    await wait_until(holds(lambda: sum(r.terms() for r in relays.values()) == 1), 20,
                     "one of two relays to lead", relays.values())
    leader = next(n for n, r in relays.items() if r.terms() == 1)

    async def writers():
        rng = random.Random(3)
        for _ in range(120):
            await fill(store, rng.randint(1, 40), start=rng.randint(0, 300), per_transaction=20)
            await asyncio.sleep(rng.uniform(0, 0.05))

    writing = asyncio.create_task(writers())
    for _ in range(3):  # the leader dies mid-stream; the standby takes over; the dead one returns as standby
        await asyncio.sleep(0.5)
        other = "b" if leader == "a" else "a"
        terms = relays[other].terms()
        relays[leader].kill()
        relays[leader].start()
        await wait_until(holds(lambda: relays[other].terms() > terms), 20,
                         f"relay {other} to take over from {leader}", relays.values())
        leader = other
    await writing
    await wait_until(lambda: all_relayed(redis, keys, pg_url), 30, "the relays to finish", relays.values())
    await asyncio.sleep(0.5)  # and nothing more comes
    terms = sorted(r.terms() for r in relays.values())  # before stopping: the last standby leads then
    for r in relays.values():
        assert r.stop() == 0
    assert await assert_topic_is_the_outbox(redis, keys, pg_url) == len(await outbox(pg_url)) > 500
    assert terms == [2, 2]
    # a killed leader appends nothing more, and a standby waits: nobody was ever fenced
    assert not any("moved under the relay" in r.log() for r in relays.values())


async def test_an_old_leader_still_appending_after_losing_postgres_is_fenced(redis, keys, pg_url, store):
    await fill(store, 3000)
    async with relaying(redis, keys, pg_url, batch=3000, standby_s=0.02) as old:
        await wait_until(holds(lambda: old.stats.terms == 1), 10, "the first relay to lead")
        async with relaying(redis, keys, pg_url, batch=3000, standby_s=0.02) as new:
            deadline = time.monotonic() + 20
            while await topic_count(redis, keys) < 300:
                assert time.monotonic() < deadline, "the first relay moved nothing"
                await asyncio.sleep(0.002)
            # its session ends (the leadership with it) while it is in the middle of its batch
            ended = await sql(pg_url, "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a JOIN pg_locks l "
                              "ON l.pid = a.pid AND l.locktype = 'advisory' AND l.granted "
                              "WHERE a.application_name = $1 AND l.objid = "  # this schema's leadership lock
                              "(hashtext('tickwave.signal_relay.' || current_schema())::bigint & 4294967295)::oid",
                              APPLICATION_NAME)
            assert len(ended) == 1
            assert await topic_count(redis, keys) < 3000, "the old leader was still appending"
            await wait_until(holds(lambda: new.stats.terms == 1), 10, "the standby to take over")
            await wait_until(lambda: all_relayed(redis, keys, pg_url), 20, "every row in the topic")
            await asyncio.sleep(0.5)  # and nothing more comes
    assert new.stats.terms >= 1
    assert old.stats.conflicts + new.stats.conflicts >= 1, "both appended at once: one of them must have been fenced"
    assert await assert_topic_is_the_outbox(redis, keys, pg_url) == 3000


async def test_two_writers_without_leadership_are_kept_exactly_once_by_the_fence(redis, keys, pg_url, store):
    await fill(store, 400, per_transaction=100)
    rows = [OutboxRow(r.id, r.ts_code, r.change, r.committed_ms) for r in await outbox(pg_url)]
    await declare(redis, keys, ["signals"], partitions=PARTITIONS)
    rng = random.Random(9)

    async def zombie(writer):
        await writer.resync()
        conflicts = 0
        while writer.last_id < rows[-1].id:
            todo = [r for r in rows if r.id > writer.last_id][: rng.randint(1, 25)]
            try:
                await writer.write(todo)
            except OffsetConflict:
                conflicts += 1
                await writer.resync()
            await asyncio.sleep(0)
        return conflicts

    conflicts = await asyncio.gather(*(zombie(TopicWriter(redis, keys, PARTITIONS)) for _ in range(3)))
    assert await assert_topic_is_the_outbox(redis, keys, pg_url) == 400
    assert sum(conflicts) > 0, "the writers never raced"


async def test_the_relay_resumes_from_the_topic_not_from_postgres_marks(redis, keys, pg_url, store):
    await fill(store, 300)
    async with relaying(redis, keys, pg_url) as relay:
        await wait_until(holds(lambda: relay.stats.last_id == 300), 10, "300 rows relayed")
    await sql(pg_url, "UPDATE signal_outbox SET relayed_at = NULL")  # the marks are bookkeeping only
    await fill(store, 20, start=300)
    async with relaying(redis, keys, pg_url) as relay:
        await wait_until(holds(lambda: relay.stats.last_id == 320), 10, "320 rows relayed")
    assert await assert_topic_is_the_outbox(redis, keys, pg_url) == 320
    assert await relayed_marks(pg_url) == 320

    for p in range(PARTITIONS):  # Redis lost the topic: it is refilled from the outbox, once
        await redis.delete(keys.topic_partition("signals", p), keys.topic_sequence("signals", p))
    async with relaying(redis, keys, pg_url) as relay:
        await wait_until(lambda: all_relayed(redis, keys, pg_url), 10, "the topic refilled")
    assert await assert_topic_is_the_outbox(redis, keys, pg_url) == 320


# --- waking -----------------------------------------------------------------------------

async def idle_leader(relay):
    await wait_until(holds(lambda: relay.stats.terms == 1), 10, "the relay to lead")
    await asyncio.sleep(0.3)  # past its first empty read: now it waits


async def test_a_notify_wakes_the_relay_at_once(redis, keys, pg_url, store):
    async with relaying(redis, keys, pg_url, poll_s=30) as relay:
        await idle_leader(relay)
        started = time.monotonic()
        await store.add(sig("600519.SH"))
        while await topic_count(redis, keys) < 1:
            assert time.monotonic() - started < 5, "the NOTIFY did not wake the relay"
            await asyncio.sleep(0.005)
        latency = time.monotonic() - started
    assert latency < 1.0, f"took {latency:.3f}s with a 30s poll"
    await assert_topic_is_the_outbox(redis, keys, pg_url)


async def test_polling_moves_a_row_whose_notify_was_lost(redis, keys, pg_url, store):
    change = SignalChange(action="add", signal=sig("600519.SH")).model_dump_json()
    async with relaying(redis, keys, pg_url, poll_s=0.3) as relay:
        await idle_leader(relay)
        # a writer whose NOTIFY never arrived: same lock, same row, no pg_notify
        conn = await asyncpg.connect(pg_url)
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('tickwave.signal_outbox.' || current_schema()))")
            await conn.execute("INSERT INTO signal_outbox (strategy, ts_code, action, change) "
                               "VALUES ('volume_wave', '600519.SH', 'add', $1)", change)
        await conn.close()
        started = time.monotonic()
        while await topic_count(redis, keys) < 1:
            assert time.monotonic() - started < 3, "polling did not pick the row up"
            await asyncio.sleep(0.01)
    await assert_topic_is_the_outbox(redis, keys, pg_url)


# --- refusals ---------------------------------------------------------------------------

async def test_a_signals_topic_not_copartitioned_with_ticks_is_refused(redis, keys, pg_url, store):
    await declare(redis, keys, ["ticks"], partitions=8)
    await declare(redis, keys, ["signals"], partitions=4)
    relay = Relay(redis, keys, pg_url, tick_partitions=8)
    with pytest.raises(RelayError, match="'signals' has 4 partitions and 'ticks' 8"):
        await relay.run(asyncio.Event())


async def test_a_topic_ahead_of_the_outbox_is_refused(redis, keys, pg_url, store):
    await fill(store, 10)
    async with relaying(redis, keys, pg_url) as relay:
        await wait_until(holds(lambda: relay.stats.last_id == 10), 10, "10 rows relayed")
    await sql(pg_url, "DELETE FROM signal_outbox")  # relayed rows may be deleted (retention) ...
    async with relaying(redis, keys, pg_url) as relay:
        await wait_until(holds(lambda: relay.stats.terms == 1 and relay.stats.resyncs == 1), 10, "a relay to resume")
    assert relay.stats.last_id == 10
    await sql(pg_url, "TRUNCATE signal_outbox RESTART IDENTITY")  # ... but ids never go back: another database
    relay = Relay(redis, keys, pg_url, tick_partitions=8)
    with pytest.raises(RelayError, match="holds outbox id 10 but the outbox ends at 0"):
        await relay.run(asyncio.Event())
