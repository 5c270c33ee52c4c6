"""Ingestion: validation, dedup, dead letters, the simulator's realism and file replay order."""

import asyncio
import logging
import csv
import json
from datetime import datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agents.ingest import TickWriter, run_ingest, topic_partitions
from agents.sources.replay import FileReplay
from agents.sources.simulator import Simulator, in_session, next_open
from schemas.universe import Listing, Universe, default_universe
from agents.validate import Reject, check_tick
from schemas.events import Tick
from schemas.market import SHANGHAI, limit_band
from streams.partition import partition_for
from tests.factories import T0
from tests.factories import raw_tick as raw
from tests.topic_reads import read_records

DEMO = default_universe().pick(20)


async def all_ticks(redis, keys, partitions=8):
    out = []
    for p in range(partitions):
        recs, bad = await read_records(redis, keys, "ticks", p, 0, count=100_000)
        assert bad == []
        out += [(p, r) for r in recs]
    return out


async def test_ticks_land_on_their_codes_partition_as_tick_json(redis, keys):
    writer = TickWriter(redis, keys, partitions=8, source="test")
    await writer.write([raw(), raw("000001.SZ", 11.3, pre_close=11.2, name="平安银行")])
    got = await all_ticks(redis, keys)
    assert {(p, r.key) for p, r in got} == {(partition_for("600519.SH", 8), b"600519.SH"),
                                            (partition_for("000001.SZ", 8), b"000001.SZ")}
    tick = Tick.model_validate_json(next(r.value for _, r in got if r.key == b"600519.SH"))
    assert tick.price == 1510.0 and tick.time == T0
    assert next(r.timestamp_ms for _, r in got if r.key == b"600519.SH") == int(T0.timestamp() * 1000)


async def test_unchanged_quotes_are_not_appended_again(redis, keys):
    writer = TickWriter(redis, keys, partitions=8, source="test")
    await writer.write([raw(), raw()])
    await writer.write([raw(), raw(seconds=3, price=1511.0, volume=1200)])
    assert writer.stats.appended == 2 and writer.stats.duplicates == 2
    assert len(await all_ticks(redis, keys)) == 2


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (raw(price=0.0), Reject.ZERO_PRICE),
        ({k: v for k, v in raw().items() if k != "price"}, Reject.MISSING_PRICE),
        (raw(code="12345"), Reject.UNKNOWN_CODE),
        (raw(price=1700.0), Reject.OUTSIDE_BAND),  # limit-up is 1650.00
        (raw(volume=-5), Reject.INVALID),
    ],
)
async def test_bad_ticks_go_to_the_dead_letter_stream_with_their_reason(redis, keys, bad, reason):
    writer = TickWriter(redis, keys, partitions=8, source="test")
    await writer.write([bad, raw(seconds=1)])  # the good tick after it still lands
    assert writer.stats.rejected[reason] == 1 and writer.stats.appended == 1
    (_, fields), = await redis.xrange(keys.dead_letters("ingest"))
    assert fields[b"reason"].decode().startswith(reason)
    assert json.loads(fields[b"raw"])["ts_code"] == bad["ts_code"]


async def test_volume_going_backwards_is_rejected(redis, keys):
    writer = TickWriter(redis, keys, partitions=8, source="test")
    await writer.write([raw(volume=5000), raw(seconds=3, price=1511.0, volume=4000)])
    assert writer.stats.rejected[Reject.VOLUME_BACKWARDS] == 1


async def test_partition_count_is_kept_in_redis_and_honoured(redis, keys):
    assert await topic_partitions(redis, keys, "ticks", 8) == 8
    assert await topic_partitions(redis, keys, "ticks", 4) == 8  # the first writer's count wins


def test_simulator_never_leaves_the_band_and_volume_never_falls():
    sim = Simulator(DEMO, seed=3, volatility=0.05)  # wild, to hit the limits
    last = {}
    for _ in range(500):
        for tick in sim.step(T0):
            band = limit_band(tick.ts_code, tick.name, tick.pre_close, T0.date())
            assert band.low <= tick.price <= band.high, tick
            assert tick.volume >= last.get(tick.ts_code, 0)
            assert tick.low <= tick.price <= tick.high
            last[tick.ts_code] = tick.volume


def test_simulator_keeps_to_the_trading_sessions():
    day = T0.replace(hour=0, minute=0)
    assert in_session(day.replace(hour=9, minute=30))
    assert not in_session(day.replace(hour=9, minute=29))
    assert not in_session(day.replace(hour=12, minute=0))
    assert in_session(day.replace(hour=14, minute=59))
    assert not in_session(day.replace(hour=15, minute=0))
    assert not in_session(day.replace(day=28, hour=10))  # a Saturday


async def test_simulated_ticks_pass_validation_end_to_end(redis, keys):
    stop = asyncio.Event()
    sim = Simulator(DEMO, interval=0.01, ignore_clock=True, seed=1)
    counts = []

    def progress(stats):
        counts.append(stats.appended)
        if stats.fetched >= 200:
            stop.set()

    stats = await run_ingest(redis, keys, sim, stop=stop, on_progress=progress)
    assert stats.rejected_total == 0 and stats.appended == stats.fetched >= 200
    assert len(await all_ticks(redis, keys)) == stats.appended


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
async def test_replay_preserves_time_order_and_count(redis, keys, tmp_path, fmt):
    rows = [raw("600519.SH", 1500 + i % 10, seconds=(i * 7919) % 1000, volume=1000) for i in range(300)]
    # distinct times per code so dedup and volume checks keep every row
    for i, r in enumerate(rows):
        r["ts_code"] = DEMO[i % 5].ts_code
        r["pre_close"] = DEMO[i % 5].pre_close
        r["price"] = DEMO[i % 5].pre_close
        r["name"] = DEMO[i % 5].name
        r["volume"] = 0
    path = tmp_path / f"ticks.{fmt}"
    if fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    replay = FileReplay(path, batch=64)
    times = [t["time"] for batch in [b async for b in replay.batches()] for t in batch]
    assert len(times) == 300 and times == sorted(times)
    stats = await run_ingest(redis, keys, FileReplay(path), stop=asyncio.Event())
    assert (stats.appended, stats.duplicates, stats.rejected_total) == (300, 0, 0)
    for p in range(8):  # within each partition, offsets follow tick time
        part = [r.timestamp_ms for q, r in await all_ticks(redis, keys) if q == p]
        assert part == sorted(part)


async def test_sigterm_flushes_and_stops_cleanly(redis, redis_url, keys, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "REDIS_URL": redis_url, "TICKWAVE_KEY_PREFIX": keys.prefix,
           "TICKWAVE_INGEST_METRICS_PORT": "0"}
    with open(tmp_path / "err", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tickwave", "ingest", "--source", "sim", "--interval", "0.05",
                                 "--ignore-clock", "--seed", "5"], env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = asyncio.get_running_loop().time() + 20
        while len(await all_ticks(redis, keys)) < 100:
            assert asyncio.get_running_loop().time() < deadline, "ingest did not start appending"
            await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    log = (tmp_path / "err").read_text()
    assert "Traceback" not in log
    line = next(l for l in log.splitlines() if "ingest stopped" in l)
    appended = int(line.split("appended=")[1].split()[0])
    # every tick the process counted as appended is in the stream: nothing half-written
    assert appended == len(await all_ticks(redis, keys)) and appended % 20 == 0


async def test_replay_at_n_times_real_time_is_paced_by_tick_time(tmp_path):
    import time as clock

    rows = []
    for i in range(21):  # ticks spread over 2 s of market time
        r = raw(seconds=0, volume=1000 + i)
        r["time"] = (T0 + timedelta(milliseconds=100 * i)).isoformat()
        rows.append(r)
    path = tmp_path / "paced.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    started = clock.monotonic()
    fast = [t for b in [b async for b in FileReplay(path, batch=1).batches()] for t in b]
    unpaced = clock.monotonic() - started
    started = clock.monotonic()
    paced = [t for b in [b async for b in FileReplay(path, speed=10, batch=1).batches()] for t in b]
    elapsed = clock.monotonic() - started
    assert len(paced) == len(fast) == 21
    # 2 s of market time at 10x is at least 0.2 s of wall time; as fast as possible is not paced
    assert elapsed >= 0.19 > unpaced


def test_replay_reads_fractional_seconds_offsets_and_naive_beijing_times(tmp_path):
    from agents.sources.replay import load_table

    path = tmp_path / "times.csv"
    path.write_text("ts_code,time,price\n600519.SH,2026-11-24 10:00:00.5,1500\n"
                    "600519.SH,2026-11-24T02:00:01Z,1501\n600519.SH,2026-11-24T10:00:02+08:00,1502\n")
    times = load_table(path)["time"].to_pylist()
    assert [t.isoformat() for t in times] == [
        "2026-11-24T02:00:00.500000+00:00", "2026-11-24T02:00:01+00:00", "2026-11-24T02:00:02+00:00"]


async def test_ingest_survives_a_redis_restart_and_loses_no_batch(keys):
    from streams.connection import connect
    from tickwave import servers

    own = servers.start_redis()
    client = connect(own.url)
    stop = asyncio.Event()
    sim = Simulator(DEMO, interval=0.05, ignore_clock=True, seed=9)
    seen = []
    task = asyncio.create_task(run_ingest(client, keys, sim, stop=stop, on_progress=lambda s: seen.append(s.appended)))
    try:
        while not seen or seen[-1] < 100:
            await asyncio.sleep(0.05)
        own.stop()  # Redis goes away (and, without persistence, comes back empty)
        await asyncio.sleep(0.5)
        assert not task.done(), "ingest died with Redis"
        own = servers.EmbeddedRedis(own.binary, port=own.port).start()
        before = seen[-1]
        deadline = asyncio.get_running_loop().time() + 15
        while seen[-1] < before + 100:
            assert asyncio.get_running_loop().time() < deadline, "ingest did not resume after Redis came back"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        stats = await asyncio.wait_for(task, 15)
        await client.aclose()
        own.stop()
    # every fetched tick was appended or dead-lettered: the batch held during the outage landed
    assert stats.fetched == stats.appended + stats.duplicates + stats.rejected_total


# The whole market and new listings: the simulator and validation read the universe.

async def test_the_simulator_gives_valid_ticks_for_5000_stocks_in_one_step(redis, keys):
    market = default_universe()
    ticks = Simulator(market.pick(5000), seed=7).step()
    assert len({t.ts_code for t in ticks}) == 5000
    assert {market.get(t.ts_code).board for t in ticks} == {b for b in market.board_counts()}
    writer = TickWriter(redis, keys, partitions=8, source="sim", universe=market)
    await writer.write(ticks)
    assert (writer.stats.appended, writer.stats.rejected_total) == (5000, 0)
    assert len(await all_ticks(redis, keys)) == 5000


NEW = Listing.of("688815.SH", "康电新材", 27.40, list_date=T0.date())  # lists on the day of T0
NEW_UNIVERSE = Universe([NEW])


def test_a_new_listing_opens_far_above_its_issue_price_on_its_first_day_and_validates():
    ticks = [t for _ in range(20) for t in Simulator([NEW], seed=4, today=T0.date()).step(T0)]
    assert min(t.open for t in ticks) >= round(27.40 * 1.3, 2)  # beyond STAR's 20% band
    assert all(check_tick(t, None, NEW) is None for t in ticks)
    assert {check_tick(t, None, None) for t in ticks} == {Reject.OUTSIDE_BAND}  # without its listing date


async def test_a_new_listings_ticks_outside_the_usual_band_are_kept_not_dead_lettered(redis, keys):
    first_day = raw(NEW.ts_code, 68.50, pre_close=27.40, name=NEW.name)  # +150%
    fifth_day = {**raw(NEW.ts_code, 90.0, pre_close=75.0, name=NEW.name),
                 "time": (T0 + timedelta(days=6)).isoformat()}  # Monday 11-30 is its fifth trading day
    sixth_day = {**raw(NEW.ts_code, 120.0, pre_close=90.0, name=NEW.name),
                 "time": (T0 + timedelta(days=7)).isoformat()}
    writer = TickWriter(redis, keys, partitions=8, source="test", universe=NEW_UNIVERSE)
    await writer.write([first_day, fifth_day, sixth_day])
    assert writer.stats.appended == 2 and writer.stats.rejected == {Reject.OUTSIDE_BAND: 1}
    (_, fields), = await redis.xrange(keys.dead_letters("ingest"))
    assert json.loads(fields[b"raw"])["price"] == 120.0
    unaware = TickWriter(redis, keys, partitions=8, source="test")  # no universe: no listing dates
    await unaware.write([first_day])
    assert unaware.stats.rejected == {Reject.OUTSIDE_BAND: 1}


def test_a_nameless_tick_takes_the_st_flag_from_the_universe_and_a_named_one_keeps_its_own():
    st = Listing.of("600289.SH", "ST信通", 10.0)
    before_st_change = T0.replace(year=2026, month=7, day=3)
    up_7 = Tick(ts_code="600289.SH", name="", time=before_st_change, price=10.70, pre_close=10.0, source="t")
    assert check_tick(up_7, None, st) == Reject.OUTSIDE_BAND  # ST band: 5% before 2026-07-06
    assert check_tick(up_7, None, None) is None
    named = up_7.model_copy(update={"name": "信通科技"})  # the stock lost its ST mark since the file was made
    assert check_tick(named, None, st) is None


def test_the_sessions_follow_the_exchange_calendar_and_say_when_they_next_open():
    holiday = datetime(2026, 10, 1, 10, 0, tzinfo=SHANGHAI)  # National Day, a Thursday
    assert not in_session(holiday)
    assert next_open(holiday) == datetime(2026, 10, 8, 9, 30, tzinfo=SHANGHAI)
    friday_close = datetime(2026, 11, 27, 15, 30, tzinfo=SHANGHAI)
    assert next_open(friday_close) == datetime(2026, 11, 30, 9, 30, tzinfo=SHANGHAI)
    lunch = datetime(2026, 11, 27, 11, 45, tzinfo=SHANGHAI)
    assert next_open(lunch) == datetime(2026, 11, 27, 13, 0, tzinfo=SHANGHAI)
    assert next_open(datetime(2026, 11, 27, 9, 30, tzinfo=SHANGHAI)) == datetime(2026, 11, 27, 9, 30, tzinfo=SHANGHAI)


async def test_a_closed_market_is_logged_once_with_the_next_open_and_the_way_round_it(caplog):
    caplog.set_level(logging.INFO, logger="tickwave.ingest")
    saturday = datetime(2026, 11, 28, 10, 0, tzinfo=SHANGHAI)
    sim = Simulator(interval=0.01, seed=1, clock=lambda: saturday)
    batches = sim.batches().__aiter__()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(batches.__anext__(), 0.2)  # twenty rounds, and not one tick
    closed = [r for r in caplog.records if r.getMessage().startswith("market closed")]
    assert len(closed) == 1
    assert "--ignore-clock" in closed[0].getMessage()
    assert closed[0].next_open == "2026-11-30T09:30+08:00"
    # with the clock ignored, the same moment simulates
    demo = Simulator(interval=0.01, seed=1, clock=lambda: saturday, ignore_clock=True).batches().__aiter__()
    assert len(await asyncio.wait_for(demo.__anext__(), 1)) == 20
