"""bench/ingest: file replay through the whole writer (validate, dedup, encode, append) beside a
raw pipelined XADD of the same entries, in one run.

    python -m bench.ingest [--ticks 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from redis.typing import EncodableT, FieldT

from agents.ingest import run_ingest
from agents.sources.replay import FileReplay
from schemas.universe import default_universe
from bench._common import Timer, drop_prefix, fresh_keys, line, redis_url
from schemas.market import SHANGHAI
from streams.codec import CODEC_VERSION, EncodedRecord, encode_record
from streams.connection import connect
from streams.partition import partition_for


def write_file(path: Path, n: int) -> None:
    from datetime import datetime

    t0 = datetime(2026, 11, 24, 9, 30, tzinfo=SHANGHAI)
    rows = []
    demo = default_universe().pick(20)
    per = len(demo)
    for i in range(n):
        listing = demo[i % per]
        step = i // per
        rows.append({
            "ts_code": listing.ts_code, "name": listing.name,
            "time": t0 + timedelta(milliseconds=step * 10), "price": round(listing.pre_close * (1 + (step % 50 - 25) / 1000), 2),
            "pre_close": listing.pre_close, "open": listing.pre_close, "high": listing.pre_close * 1.03,
            "low": listing.pre_close * 0.97, "volume": step * 100, "amount": step * 100 * listing.pre_close,
            "bid1": listing.pre_close, "ask1": listing.pre_close,
        })
    pq.write_table(pa.Table.from_pylist(rows), path)


async def raw_baseline(url: str, entries: list[tuple[str, EncodedRecord]]) -> float:
    """redis-benchmark style: pipelined XADD of the same encoded entries, 1,000 per round trip,
    with the fields the append script writes (`n` only when the value is None)."""
    client = connect(url)
    keys = fresh_keys()
    try:
        with Timer() as t:
            for i in range(0, len(entries), 1000):
                pipe = client.pipeline(transaction=False)
                for code, (k, v, h, ts, null) in entries[i:i + 1000]:
                    fields: dict[FieldT, EncodableT] = {b"k": k, b"v": v, b"h": h, b"t": ts, b"c": CODEC_VERSION}
                    if null:
                        fields[b"n"] = null
                    pipe.xadd(keys.topic_partition("ticks", partition_for(code, 8)), fields)
                await pipe.execute()
        return len(entries) / t.seconds
    finally:
        await drop_prefix(client, keys)
        await client.aclose()


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, redis_url() as url:
        path = Path(tmp) / "ticks.parquet"
        write_file(path, n)
        print(f"bench/ingest  {time.strftime('%Y-%m-%d %H:%M')}  ticks={n}")
        client = connect(url)
        keys = fresh_keys()
        try:
            with Timer() as t:
                stats = await run_ingest(client, keys, FileReplay(path, batch=10_000), stop=asyncio.Event())
            ours = stats.appended / t.seconds
            assert stats.rejected_total == 0, stats.rejected
        finally:
            await drop_prefix(client, keys)
            await client.aclose()
        # the baseline appends the very entries the writer produced, already encoded
        table = pq.read_table(path).to_pylist()
        from schemas.events import Tick

        entries = []
        for row in table:
            tick = Tick.model_validate({**row, "source": "file"})
            entries.append((tick.ts_code, encode_record(tick.ts_code.encode(), tick.model_dump_json().encode())))
        base = await raw_baseline(url, entries)
        print(line("file replay -> ticks topic (full writer)", ours, "ticks/s", base, "raw pipelined XADD"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ticks", type=int, default=200_000)
    return p


if __name__ == "__main__":
    asyncio.run(main(parser().parse_args().ticks))
