"""bench/driver: messages/s through one faust agent on the Redis Streams driver, beside a raw
redis-py XREADGROUP -> XADD loop moving the same messages in the same run.

    python -m bench.driver [--messages 100000] [--partitions 4] [--loop aio|uvloop]

The agent runs in one worker process (`bench/driver_app.py`); its rate is taken from
its first output to its last, so start-up and the first rebalance are not counted.
Uses REDIS_URL when set, else an embedded Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._common import drop_prefix, fresh_keys, line, redis_url
from streams.codec import encode_record
from streams.connection import AnyRedis, connect
from streams.keys import Keys
from streams.log import PartitionLog
from streams.partition import partition_for

REPO = Path(__file__).resolve().parents[1]
STALL_S = 30.0  # no new output for this long ends the run: the agent is stuck or dead


async def preload(client: AnyRedis, keys: Keys, topic: str, n: int, partitions: int) -> None:
    """n keyed records of ~100 bytes, spread over the partitions."""
    log = PartitionLog(client, keys, topic)
    await client.hset(keys.topic_meta(topic), "partitions", partitions)
    for start in range(0, n, 10_000):
        batches: dict[int, list] = {}  # type: ignore[type-arg]
        for i in range(start, min(n, start + 10_000)):
            key = f"60{i % 5000:04d}.SH".encode()
            batches.setdefault(partition_for(key, partitions), []).append(
                encode_record(key, b'{"price": 1500.25, "volume": 1200, "seq": %d, "pad": "xxxxxxxxxxxxxxxxxxxx"}' % i))
        await log.append_many(batches)


async def out_count(client: AnyRedis, keys: Keys, topic: str, partitions: int) -> int:
    pipe = client.pipeline(transaction=False)
    for p in range(partitions):
        pipe.xlen(keys.topic_partition(topic, p))
    return sum(await pipe.execute())


async def bench_raw(client: AnyRedis, keys: Keys, n: int, partitions: int) -> float:
    """The baseline: XREADGROUP COUNT 1000 over the partitions, pipelined XADD of each entry
    to an output stream and XACK, until all n moved."""
    streams = [keys.topic_partition("bench-in", p) for p in range(partitions)]
    for s in streams:
        await client.xgroup_create(s, "raw", id="0")
    out = keys.topic_partition("raw-out", 0)
    moved = 0
    start = time.perf_counter()
    while moved < n:
        reply = await client.xreadgroup("raw", "c1", {s: ">" for s in streams}, count=1000)
        pipe = client.pipeline(transaction=False)
        for key, entries in reply:
            for _eid, fields in entries:
                pipe.xadd(out, fields)
            pipe.xack(key, "raw", *[eid for eid, _ in entries])
            moved += len(entries)
        await pipe.execute()
    return n / (time.perf_counter() - start)


async def bench_agent(url: str, keys: Keys, client: AnyRedis, n: int, partitions: int,
                      loop: str) -> tuple[float, float]:
    """(msgs/s through the agent, seconds from worker start to its first output)."""
    broker = f"{url}?prefix={keys.prefix}"
    datadir = Path(tempfile.mkdtemp(prefix="tickwave-bench-"))
    env = {**os.environ, "BENCH_BROKER": broker, "BENCH_PARTITIONS": str(partitions), "BENCH_DATADIR": str(datadir)}
    log = open(datadir / "worker.log", "wb")
    started = time.perf_counter()
    # -l info, not warn: at warn faust's terminal spinner lowers the root logger to DEBUG,
    # and every faust.debug() call then builds a record (7% of the worker's time)
    proc = subprocess.Popen([sys.executable, "-m", "bench.driver_app", "-L", loop, "worker", "-l", "info",
                             "--without-web"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    def failed(reason: str) -> RuntimeError:
        tail = Path(log.name).read_bytes()[-3000:].decode(errors="replace")
        return RuntimeError(f"{reason}; the end of {log.name}:\n{tail}")

    try:
        first_at = None
        done = 0
        last_print = 0.0
        progressed_at = started
        while done < n:
            if proc.poll() is not None:
                raise failed(f"worker exited with {proc.returncode}")
            count = await out_count(client, keys, "bench-out", partitions)
            now = time.perf_counter()
            if count > done:
                done, progressed_at = count, now
            elif now - progressed_at > STALL_S:
                raise failed(f"nothing forwarded for {STALL_S:.0f} s ({done:,}/{n:,})")
            if done and first_at is None:
                first_at, first_count = now, done
            if now - last_print > 1.0:
                print(f"  agent: {done:,}/{n:,} forwarded", file=sys.stderr, flush=True)
                last_print = now
            await asyncio.sleep(0.02)
        assert first_at is not None
        elapsed = time.perf_counter() - first_at
        rate = (n - first_count) / elapsed if elapsed > 0 else float("inf")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    shutil.rmtree(datadir)  # kept when the run fails: the error names its worker.log
    return rate, first_at - started


async def main(n: int, partitions: int, loop: str) -> None:
    with redis_url() as url:
        client = connect(url)
        keys = fresh_keys()
        try:
            await preload(client, keys, "bench-in", n, partitions)
            raw = await bench_raw(client, keys, n, partitions)
            agent, startup = await bench_agent(url, keys, client, n, partitions, loop)
        finally:
            await drop_prefix(client, keys)
            await client.aclose()
    print(f"bench/driver: {n:,} messages, {partitions} partitions, one worker ({loop} loop), "
          f"{time.strftime('%Y-%m-%d')}")
    print(line("faust agent consume -> send (driver)", agent, "msgs/s", raw, "raw XREADGROUP->XADD"))
    print(f"{'worker start to first output':<44} {startup:>12,.1f} s")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.driver", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--loop", choices=["aio", "uvloop"], default="aio",
                   help="the worker's event loop (uvloop comes with the `bench` extra)")
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    asyncio.run(main(args.messages, args.partitions, args.loop))
