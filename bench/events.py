"""bench/events: append_events vs plain XADD, archiver vs bare COPY, history across the boundary.

    python -m bench.events [--events 100000] [--history 10000]
    python -m bench.events --replica-wait 20 [--events 5000]

The second starts a local Redis Cluster (3 masters, 3 replicas) and measures what WAIT costs
after each append (TICKWAVE_WORKER_REPLICA_WAIT_MS): one event per append, p50 and p99, and
batches of 100, each beside the same appends without WAIT.

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
from streams.archive import ArchiveStore, row_from_entry
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
            rows = [row_from_entry("bench", epoch, eid.decode(), f) for eid, f in raw]
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


async def bench_history(rurl: str, purl: str, size: int) -> tuple[float, float, int]:
    """ms for `size` events of which about half come from the archive, half from Redis."""
    client = connect(rurl)
    keys = fresh_keys()
    try:
        async with scratch_schema(purl) as dsn:
            pool = await create_pool(dsn)
            store = ArchiveStore(pool)
            half = size // 2
            # archived a chunk at a time as it is appended; a chunk never exceeds what Redis keeps
            chunk = min(1000, half)
            # archived a chunk at a time below, by hand: no archive group holds the trimming
            log = EventLog(client, keys, maxlen=half, archive_group=None)
            events = make_events(2 * size)
            ids: list[str] = []
            for i in range(0, len(events), chunk):
                ids += await log.append_events("bench", events[i:i + chunk])
                batch = await log.read_after("bench", ids[-chunk - 1] if len(ids) > chunk else None)
                await store.write("bench", await log.epoch("bench") or "", batch)
            first_kept = await log.first_id("bench")
            boundary = ids.index(first_kept)  # type: ignore[arg-type]
            after = ids[max(0, boundary - half) - 1]
            samples, redis_only = [], []
            for _ in range(7):
                t = time.perf_counter()
                got = await history(log, store, "bench", epoch=None, after_id=after, limit=size)
                samples.append((time.perf_counter() - t) * 1000)
                assert got.covered and len(got.events) == size
                t = time.perf_counter()
                await log.read_after("bench", first_kept, count=size)
                redis_only.append((time.perf_counter() - t) * 1000)
            await pool.close()
            return statistics.median(samples), statistics.median(redis_only), len(ids) - boundary
    finally:
        await drop_prefix(client, keys)
        await client.aclose()


async def main(n: int, size: int) -> None:
    with redis_url() as rurl, database_url() as purl:
        print(f"bench/events  {time.strftime('%Y-%m-%d %H:%M')}  events={n} history={size}")
        ours, plain = await bench_append(rurl, n)
        print(line("(a) append_events, batches of 100", ours, "ev/s", plain, "plain XADD"))
        ours, bare = await bench_archive(rurl, purl, n)
        print(line("(b) archiver into PostgreSQL", ours, "ev/s", bare, "bare COPY"))
        ms, redis_ms, in_redis = await bench_history(rurl, purl, size)
        print(line(f"(c) history of {size:,} across the boundary", ms, "ms", redis_ms, f"XRANGE {size:,}"))
        print(f"    ({size - min(in_redis, size)} from the archive, the rest from Redis; median of 7)")


async def bench_replica_wait(url: str, n: int, wait_ms: int) -> dict[str, tuple[float, float]]:
    """(with WAIT, without) for one-event appends' p50 and p99 (ms) and 100-event batches (ev/s);
    the rounds alternate, each on a fresh strategy."""
    from streams.events import REPLICA_UNACKED

    client = connect(url)
    keys = fresh_keys()
    single: dict[bool, list[float]] = {True: [], False: []}
    batched: dict[bool, list[float]] = {True: [], False: []}
    try:
        for rnd in range(4):
            for wait in (False, True):
                log = EventLog(client, keys, replica_wait_ms=wait_ms if wait else 0, archive_group=None)
                name = f"w{rnd}{int(wait)}"
                events, batch_events = make_events(n // 8 + 1, name), make_events(n, name + "b")
                await log.append_events(name, events[:1])  # the stream exists, the script is loaded
                for e in events[1:]:
                    t0 = time.perf_counter()
                    await log.append_events(name, [e])
                    single[wait].append((time.perf_counter() - t0) * 1000)
                with Timer() as t:
                    for i in range(0, n, 100):
                        await log.append_events(name + "b", batch_events[i:i + 100])
                batched[wait].append(n / t.seconds)
        unacked = sum(s.value for m in REPLICA_UNACKED.collect() for s in m.samples if s.name.endswith("_total"))
        print(f"    ({unacked:.0f} appends not acknowledged by a replica within {wait_ms} ms)")
        return {
            "p50": (statistics.median(single[True]), statistics.median(single[False])),
            "p99": (statistics.quantiles(single[True], n=100)[98], statistics.quantiles(single[False], n=100)[98]),
            "batch": (statistics.median(batched[True]), statistics.median(batched[False])),
        }
    finally:
        await client.aclose()


async def main_replica_wait(n: int, wait_ms: int) -> None:
    import tempfile
    from pathlib import Path

    from tickwave import cluster as local_cluster

    c = await asyncio.to_thread(local_cluster.LocalCluster(local_cluster.binary(),
                                                           Path(tempfile.mkdtemp(prefix="bench-cluster-"))).start)
    try:
        print(f"bench/events  {time.strftime('%Y-%m-%d %H:%M')}  events={n} replica_wait_ms={wait_ms} (Redis Cluster)")
        got = await bench_replica_wait(c.url, n, wait_ms)
        print(line("(d) one event per append, WAIT, p50", got["p50"][0], "ms", got["p50"][1], "no WAIT"))
        print(line("(e) one event per append, WAIT, p99", got["p99"][0], "ms", got["p99"][1], "no WAIT"))
        print(line("(f) batches of 100, WAIT", got["batch"][0], "ev/s", got["batch"][1], "no WAIT"))
    finally:
        await asyncio.to_thread(c.stop)


def history_size(text: str) -> int:
    n = int(text)
    if n < 200:
        raise argparse.ArgumentTypeError("at least 200: Redis trims whole stream nodes of 100 entries")
    return n


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=100_000, help="events appended in (a) and archived in (b)")
    p.add_argument("--history", type=history_size, default=10_000, help="events read across the boundary in (c)")
    p.add_argument("--replica-wait", type=int, default=0, metavar="MS",
                   help="instead: WAIT's cost after appends on a local Redis Cluster, (d)-(f)")
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    if args.replica_wait:
        asyncio.run(main_replica_wait(args.events, args.replica_wait))
    else:
        asyncio.run(main(args.events, args.history))
