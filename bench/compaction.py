"""bench/compaction: a table changelog partition written through the append script with and
without compaction, in one run: append throughput, Redis memory kept, and the time to read
the partition back (what a recovering worker reads).

    python -m bench.compaction [--updates 200000] [--keys 5000] [--batch 200]
"""

from __future__ import annotations

import argparse
import asyncio
import random

from bench._common import Timer, drop_prefix, fresh_keys, line, redis_url
from streams.codec import encode_record
from streams.connection import AnyRedis, connect
from streams.keys import Keys
from streams.log import PartitionLog


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.compaction", description=__doc__)
    p.add_argument("--updates", type=int, default=200_000, help="table updates written")
    p.add_argument("--keys", type=int, default=5_000, help="distinct table keys (stocks)")
    p.add_argument("--batch", type=int, default=200, help="records per append call (a producer batch)")
    return p


async def write(client: AnyRedis, keys: Keys, topic: str, batches: list[list], compacting: bool) -> float:
    log = PartitionLog(client, keys, topic, compacting=compacting)
    with Timer() as t:
        for batch in batches:
            await log.append(0, batch)
    return t.seconds


async def memory(client: AnyRedis, *names: str) -> int:
    total = 0
    for name in names:
        total += int(await client.memory_usage(name, samples=0) or 0)  # samples=0: every entry counted
    return total


async def read_back(client: AnyRedis, keys: Keys, topic: str) -> tuple[float, int]:
    stream, low, n = keys.topic_partition(topic, 0), "-", 0
    with Timer() as t:
        while True:
            entries = await client.xrange(stream, min=low, count=1000)
            if not entries:
                break
            n += len(entries)
            low = "(" + entries[-1][0].decode()
    return t.seconds, n


async def main(args: argparse.Namespace) -> None:
    rng = random.Random(1)
    codes = [f"{600000 + i:06d}.SH".encode() for i in range(args.keys)]
    records = [encode_record(rng.choice(codes), b'{"adv":%d,"dec":%d,"chg":%d,"amount":%d,"day":"2026-11-30"}' % (
        rng.randrange(5000), rng.randrange(5000), rng.randrange(-1000, 1000), rng.randrange(10**9)))
        for _ in range(args.updates)]
    batches = [records[i:i + args.batch] for i in range(0, len(records), args.batch)]
    with redis_url() as url:
        client = connect(url)
        keys = fresh_keys()
        try:
            # alternate the order so neither side always runs on a warm server
            plain_s = await write(client, keys, "plain", batches, False)
            compact_s = await write(client, keys, "compact", batches, True)
            plain_s = min(plain_s, await write(client, keys, "plain2", batches, False))
            compact_s = min(compact_s, await write(client, keys, "compact2", batches, True))
            n = len(records)
            kept = int(await client.xlen(keys.topic_partition("compact", 0)))
            print(f"{n:,} updates over {args.keys:,} keys in batches of {args.batch}; "
                  f"compacted partition keeps {kept:,} entries, plain {await client.xlen(keys.topic_partition('plain', 0)):,}")
            print(line("(a) append, compacting", n / compact_s, "records/s", n / plain_s, "plain"))
            stream_only = await memory(client, keys.topic_partition("compact", 0))
            with_hash = await memory(client, keys.topic_partition("compact", 0), keys.topic_compaction("compact", 0))
            plain_mem = await memory(client, keys.topic_partition("plain", 0))
            print(line("(b) memory, compacting (stream + key hash)", with_hash / 2**20, "MiB", plain_mem / 2**20, "plain"))
            print(f"    compacted stream alone {stream_only / 2**20:.1f} MiB, key hash {(with_hash - stream_only) / 2**20:.1f} MiB; "
                  f"{with_hash / n:.1f} vs {plain_mem / n:.1f} bytes per update")
            compact_read, got = await read_back(client, keys, "compact")
            plain_read, _ = await read_back(client, keys, "plain")
            print(line("(c) read the partition back, compacted", compact_read * 1000, "ms", plain_read * 1000, "plain"))
            print(f"    {got:,} entries read back compacted, {n:,} plain")
        finally:
            await drop_prefix(client, keys)
            await client.aclose()


if __name__ == "__main__":
    asyncio.run(main(parser().parse_args()))
