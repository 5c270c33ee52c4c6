"""bench/events: append_events vs plain XADD, archiver vs bare COPY, history across the boundary.

    python -m bench.events [--events 100000]

Uses REDIS_URL / DATABASE_URL when set, else embedded servers. Prints each
figure beside its baseline from the same run, and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from agents.archiver import Archiver
from agents.generator import PriceWalk
from schemas.universe import default_universe
from bench._common import (
    Timer,
    database_url,
    drop_prefix,
    fresh_keys,
    line,
    redis_url,
    scratch_schema,
)
from streams.archive import ArchiveStore, row_from_fields
from streams.codec import encode_event
from streams.connection import connect
from streams.events import EventLog
from streams.history import history
from streams.pg import create_pool


def make_events(n: int, strategy: str = "bench") -> list:  # type: ignore[type-arg]
    walk = PriceWalk(default_universe().pick(20), strategy, seed=1)
    return [walk.next_event() for _ in range(n)]


async def bench_append(url: str, n: int) -> tuple[float, float]:
    client = connect(url)
    events = make_events(n)
    encoded = [encode_event(e) for e in events]
    keys = fresh_keys()
    try:
        # baseline: the same encoded events, plain XADD pipelined 100 at a time
        with Timer() as plain:
            for i in range(0, n, 100):
                pipe = client.pipeline(transaction=False)
                for fields in encoded[i:i + 100]:
                    pipe.xadd(keys.events("plain"), fields)
                await pipe.execute()
        log = EventLog(client, keys)
        with Timer() as ours:
            for i in range(0, n, 100):
                await log.append_events("bench", events[i:i + 100])
        assert await client.xlen(keys.events("bench")) == n
        return n / ours.seconds, n / plain.seconds
    finally:
        await drop_prefix(client, keys)
        await client.aclose()


async def bench_archive(rurl: str, purl: str, n: int) -> tuple[float, float]:
    client = connect(rurl)
    keys = fresh_keys()
    try:
        async with scratch_schema(purl) as dsn:
            pool = await create_pool(dsn)
            log = EventLog(client, keys)
            events = make_events(n)
            for i in range(0, n, 1000):
                await log.append_events("bench", events[i:i + 1000])
            epoch = await log.epoch("bench") or "e"
            raw = await client.xrange(keys.events("bench"))
            rows = [row_from_fields("bench", epoch, eid.decode(), "600519.SH", f) for eid, f in raw]
            # baseline: a bare COPY of the same rows into an identical table, no staging, no dedup
            async with pool.acquire() as conn:
                await conn.execute("CREATE TABLE bare (LIKE event_archive INCLUDING ALL)")
                with Timer() as bare:
                    for i in range(0, n, 2000):
                        await conn.copy_records_to_table(
                            "bare", records=rows[i:i + 2000],
                            columns=("strategy", "epoch", "ms", "seq", "ts_code", "kind", "schema_version", "event"))
            stop = asyncio.Event()
            archiver = Archiver(client, keys, ArchiveStore(pool), consumer="bench", batch=2000, refresh_s=0.05)

            def progress(stats) -> None:  # type: ignore[no-untyped-def]
                if stats.archived >= n:
                    stop.set()

            archiver.on_progress = progress
            with Timer() as ours:
                await archiver.run(stop)
            await pool.close()
            return n / ours.seconds, n / bare.seconds
    finally:
        await drop_prefix(client, keys)
        await client.aclose()


async def bench_history(rurl: str, purl: str) -> tuple[float, float, int]:
    """ms for 10,000 events of which about half come from the archive, half from Redis."""
    client = connect(rurl)
    keys = fresh_keys()
    try:
        async with scratch_schema(purl) as dsn:
            pool = await create_pool(dsn)
            store = ArchiveStore(pool)
            log = EventLog(client, keys, maxlen=5000)
            events = make_events(20_000)
            ids: list[str] = []
            for i in range(0, len(events), 1000):
                ids += await log.append_events("bench", events[i:i + 1000])
                batch = await log.read_after("bench", ids[-1001] if len(ids) > 1000 else None)
                await store.write("bench", await log.epoch("bench") or "", batch)
            first_kept = await log.first_id("bench")
            boundary = ids.index(first_kept)  # type: ignore[arg-type]
            after = ids[max(0, boundary - 5000) - 1]
            samples, redis_only = [], []
            for _ in range(7):
                t = time.perf_counter()
                got = await history(log, store, "bench", epoch=None, after_id=after, limit=10_000)
                samples.append((time.perf_counter() - t) * 1000)
                assert got.covered and len(got.events) == 10_000
                t = time.perf_counter()
                await log.read_after("bench", first_kept, count=10_000)
                redis_only.append((time.perf_counter() - t) * 1000)
            await pool.close()
            return statistics.median(samples), statistics.median(redis_only), len(ids) - boundary
    finally:
        await drop_prefix(client, keys)
        await client.aclose()


async def main(n: int) -> None:
    with redis_url() as rurl, database_url() as purl:
        print(f"bench/events  {time.strftime('%Y-%m-%d %H:%M')}  events={n}")
        ours, plain = await bench_append(rurl, n)
        print(line("(a) append_events, batches of 100", ours, "ev/s", plain, "plain XADD"))
        ours, bare = await bench_archive(rurl, purl, n)
        print(line("(b) archiver into PostgreSQL", ours, "ev/s", bare, "bare COPY"))
        ms, redis_ms, in_redis = await bench_history(rurl, purl)
        print(line("(c) history of 10,000 across the boundary", ms, "ms", redis_ms, "XRANGE 10k"))
        print(f"    ({10_000 - min(in_redis, 10_000)} from the archive, the rest from Redis; median of 7)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    asyncio.run(main(parser.parse_args().events))
