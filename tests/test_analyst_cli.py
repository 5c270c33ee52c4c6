"""`tickwave export` and `tickwave tail` as an analyst runs them: real processes, real Redis,
PostgreSQL and edge."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sys
from datetime import datetime
from pathlib import Path

import asyncpg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.events import PriceChange
from schemas.market import SHANGHAI
from streams.archive import ArchiveStore
from streams.codec import decode_event, event_fields, parse_id
from streams.events import EventLog
from streams.pg import create_pool, upgrade
from tests.edge_harness import edge_settings, running_edge
from tests.factories import price_changes, signal_change
from tickwave.export import SCHEMA, boundary

REPO = Path(__file__).resolve().parents[1]
S = "volume_wave"


async def tickwave(*argv: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tickwave", *argv, env=env, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def cli_env(redis_url: str, keys, pg_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(REDIS_URL=redis_url, TICKWAVE_KEY_PREFIX=keys.prefix)
    if pg_url:
        env["DATABASE_URL"] = pg_url
    return env


async def partly_archived(redis, keys, pg_url: str, *, archive: bool = True) -> list[str]:
    """2,000 price events and 20 signal changes. Redis keeps about the newest 500; the archive
    holds the first 1,700 (the archiver is behind, but past where Redis starts), so a range
    reads from the archive alone, then both, then Redis alone."""
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    store = ArchiveStore(pool)
    # no archive group holding retention: the setup wants Redis trimmed past what is archived
    log = EventLog(redis, keys, maxlen=500, archive_group=None)
    ids: list[str] = []
    try:
        for start in range(0, 2000, 100):
            batch = [*price_changes(50, start=start), signal_change("add" if start % 200 else "remove"),
                     *price_changes(50, start=start + 50)]
            written = await log.append_events(S, batch)
            ids += written
            if archive and start < 1700:
                await store.write(S, await log.epoch(S), await log.read_after(S, ids[-len(written) - 1]
                                                                                if len(ids) > len(written) else None))
        assert await log.first_id(S) != ids[0], "setup: Redis should have trimmed"
    finally:
        await pool.close()
    return ids


async def archive_and_redis(redis, keys, pg_url: str) -> dict[str, tuple[str, object]]:
    """Every event the archive and Redis hold, by id, read straight from both (not through history)."""
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT epoch, ms, seq, kind, schema_version, event::text AS event "
                                "FROM event_archive WHERE strategy = $1", S)
    finally:
        await conn.close()
    out: dict[str, tuple[str, object]] = {}
    for r in rows:
        eid = f"{r['ms']}-{r['seq']}"
        out[eid] = (r["epoch"], decode_event(eid, event_fields(r["kind"].encode(), r["schema_version"],
                                                               r["event"].encode())))
    epoch = await EventLog(redis, keys).epoch(S)
    assert epoch is not None
    for eid, fields in await redis.xrange(keys.events(S)):
        event = decode_event(eid, fields)
        if eid.decode() in out:
            assert out[eid.decode()] == (epoch, event), "the archive and Redis disagree"
        out[eid.decode()] = (epoch, event)
    return out


def in_range(held: dict[str, tuple[str, object]], since: str, until: str) -> list[tuple[str, str, object]]:
    low, high = parse_id(since), parse_id(until)
    return [(i, *held[i]) for i in sorted(held, key=parse_id) if low < parse_id(i) <= high]


def record(event_id: str, epoch: str, e: PriceChange) -> dict:
    return {"event_id": event_id, "epoch": epoch, "strategy": e.strategy, "ts_code": e.ts_code, "name": e.name,
            "price": e.price, "pre_close": e.pre_close, "change": e.change, "change_percent": e.change_percent,
            "signal_price": e.signal_price, "change_since_signal_percent": e.change_since_signal_percent,
            "volume": e.volume, "tick_time": e.tick_time, "ingest_time": e.ingest_time,
            "source_partition": e.source_partition, "source_offset": e.source_offset}


@pytest.mark.timeout(90)
async def test_export_parquet_rows_equal_the_archive_plus_redis_for_the_range(redis_url, redis, keys, pg_url, tmp_path):
    ids = await partly_archived(redis, keys, pg_url)
    since, until = ids[100], ids[1950]
    first_kept = await EventLog(redis, keys).first_id(S)
    archived = await archive_and_redis(redis, keys, pg_url)
    assert first_kept and parse_id(since) < parse_id(first_kept) < parse_id(until), "setup: the range spans the seam"
    out = tmp_path / "wave.parquet"
    # pages of 300: some end in the archive, one crosses where Redis starts, the rest are Redis's
    code, _, err = await tickwave("export", S, "--since", since, "--until", until, "--out", str(out),
                                  "--page-size", "300", env=cli_env(redis_url, keys, pg_url))
    assert code == 0, err
    expected = [record(i, epoch, e) for i, epoch, e in in_range(archived, since, until) if isinstance(e, PriceChange)]
    assert len(expected) == 1850 - 18  # the range holds 18 signal changes, which are not price rows
    table = pq.read_table(out)
    assert table.schema.equals(SCHEMA), table.schema
    assert table.schema.field("tick_time").type == pa.timestamp("us", tz="Asia/Shanghai")
    assert table.schema.field("price").type == pa.float64()
    assert table.to_pylist() == expected
    assert pq.ParquetFile(out).metadata.num_row_groups > 5
    assert "export volume_wave" in err and f"wrote {len(expected)} price events" in err  # the progress bar, the sum
    assert [p.name for p in tmp_path.iterdir()] == ["wave.parquet"]


async def test_export_csv_and_ndjson_hold_the_same_range(redis_url, redis, keys, pg_url, tmp_path):
    ids = await partly_archived(redis, keys, pg_url)
    since, until = ids[10], ids[1990]
    env = cli_env(redis_url, keys, pg_url)
    held = in_range(await archive_and_redis(redis, keys, pg_url), since, until)
    assert (await tickwave("export", S, "--since", since, "--until", until, "--out", str(tmp_path / "a.csv"),
                           env=env))[0] == 0
    assert (await tickwave("export", S, "--since", since, "--until", until, "--out", str(tmp_path / "a.ndjson"),
                           env=env))[0] == 0
    with open(tmp_path / "a.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["event_id"] for r in rows] == [i for i, _, e in held if isinstance(e, PriceChange)]
    assert [datetime.fromisoformat(r["tick_time"]) for r in rows] == [
        e.tick_time for _, _, e in held if isinstance(e, PriceChange)]
    docs = [json.loads(line) for line in (tmp_path / "a.ndjson").read_text().splitlines()]
    assert [(d["event_id"], d["kind"]) for d in docs] == [
        (i, "price" if isinstance(e, PriceChange) else "signal") for i, _, e in held]


async def test_export_refuses_a_range_with_a_hole_and_writes_nothing(redis_url, redis, keys, pg_url, tmp_path):
    ids = await partly_archived(redis, keys, pg_url, archive=False)  # trimmed and never archived
    out = tmp_path / "wave.parquet"
    out.write_bytes(b"yesterday's export")
    code, stdout, err = await tickwave("export", S, "--since", ids[0], "--out", str(out),
                                       env=cli_env(redis_url, keys, pg_url))
    assert code == 3, err
    assert "history cannot cover volume_wave" in err and "hole" in err and "nothing written" in err
    assert out.read_bytes() == b"yesterday's export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wave.parquet"]  # no partial file left behind
    # a range Redis still holds whole is not refused
    code, _, err = await tickwave("export", S, "--since", ids[-10], "--out", str(tmp_path / "tail.ndjson"),
                                  env=cli_env(redis_url, keys, pg_url))
    assert code == 0, err
    assert len((tmp_path / "tail.ndjson").read_text().splitlines()) == 9


async def test_export_of_an_unknown_strategy_is_refused(redis_url, keys, tmp_path):
    code, _, err = await tickwave("export", "nobody", "--out", str(tmp_path / "x.csv"), env=cli_env(redis_url, keys))
    assert code == 3 and "no such strategy" in err
    assert list(tmp_path.iterdir()) == []


def test_export_bounds_by_time_take_events_at_or_after_since_and_before_until():
    at = datetime(2026, 11, 24, 10, 0, tzinfo=SHANGHAI)
    ms = int(at.timestamp() * 1000)
    bound = parse_id(boundary("2026-11-24T10:00:00"))  # naive: Beijing time
    assert (ms - 1, 0) < bound < (ms, 0)  # after it: every id of that millisecond on
    assert boundary("2026-11-24T02:00:00+00:00") == boundary("2026-11-24T10:00:00")
    assert boundary("1732415403000-7") == "1732415403000-7"
    with pytest.raises(ValueError):
        boundary("yesterday")


# --- tail ------------------------------------------------------------------------------

async def test_tail_since_an_id_prints_every_later_event_then_live_ones(redis_url, redis, keys):
    log = EventLog(redis, keys)
    ids = await log.append_events(S, price_changes(20))
    async with running_edge(edge_settings(redis_url, keys)) as base:
        env = {**cli_env(redis_url, keys), "TICKWAVE_URL": base}
        code, out, err = await tickwave("tail", S, "--since", ids[4], "--count", "15", env=env)
        assert code == 0, err
        lines = out.splitlines()
        assert [line.split()[0] for line in lines] == ids[5:]
        assert "resumed after" in err and "15 events replayed" in err
        first = (await log.snapshot(S))[0].event
        assert any(line.split()[2] == first.ts_code for line in lines)

        # live: events appended after the tail started arrive, signal changes included
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tickwave", "tail", S, "--count", "6", "--format", "json", env=env, cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None
        seen = await asyncio.wait_for(proc.stderr.readline(), 20)
        assert b"snapshot of 3 stocks" in seen
        live = await log.append_events(S, [*price_changes(3, start=20), signal_change(), *price_changes(2, start=23)])
        out_b, _ = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0
        docs = {d["event_id"]: d["type"] for d in map(json.loads, out_b.decode().splitlines())}
        # (the edge sends a read's price rows before its signal changes: see docs/client.md)
        assert docs == dict(zip(live, ["price"] * 3 + ["signal"] + ["price"] * 2))


async def test_tail_since_an_id_the_edge_cannot_replay_exits_3(redis_url, redis, keys):
    log = EventLog(redis, keys)
    ids = await log.append_events(S, price_changes(5))
    epoch = await log.epoch(S)
    await redis.delete(keys.events(S))
    await log.append_events(S, price_changes(5, start=5))  # the stream recreated: another epoch
    async with running_edge(edge_settings(redis_url, keys)) as base:
        code, out, err = await tickwave("tail", S, "--since", ids[-1], "--epoch", epoch or "", "--count", "1",
                                        env={**cli_env(redis_url, keys), "TICKWAVE_URL": base})
    assert code == 3 and out == ""
    assert f"cannot resume volume_wave after {ids[-1]}" in err


async def test_tail_table_shows_the_latest_price_of_every_stock(redis_url, redis, keys):
    log = EventLog(redis, keys)
    await log.append_events(S, price_changes(3))
    async with running_edge(edge_settings(redis_url, keys)) as base:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tickwave", "tail", S, "--format", "table", "--count", "6", "--refresh", "0.1",
            env={**cli_env(redis_url, keys), "TICKWAVE_URL": base}, cwd=REPO,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None
        assert b"snapshot" in await asyncio.wait_for(proc.stderr.readline(), 20)
        live = await log.append_events(S, price_changes(6, start=3))
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, out
    text = out.decode()
    last = text[text.rindex("volume_wave: "):].splitlines()  # the last redraw
    assert last[0].startswith("volume_wave: 3 stocks")
    latest = {s.event.ts_code: (s.event.price, s.id) for s in await log.snapshot(S)}
    # code, name, price, change, since signal, time, event id (the factories' names are empty)
    shown = {line.split()[0]: (float(line.split()[-5]), line.split()[-1]) for line in last[2:]}
    assert shown == latest and set(i for _, i in shown.values()) == set(live[-3:])
