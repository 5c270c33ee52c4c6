"""bench/signals_api: `GET /api/signals/buy?strategy=` at 500 signals, p50 and p99, beside a
bare aiohttp handler answering the same JSON from memory (and, for scale, a raw asyncpg fetch
of the same 500 rows). One keep-alive client sends requests one after another, ours and the
baseline's in alternating rounds so both see the same noise. Then the worst case: a change
committed before every request, so the edge rebuilds the list each time.

    python -m bench.signals_api [--signals 500] [--requests 3000]

Uses REDIS_URL / DATABASE_URL when set, else embedded servers. Target: p99 <= 5 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta

import aiohttp
import asyncpg

from bench._common import line, database_url, fresh_keys, redis_url, scratch_schema
from bench.edge import percentile, stop, wait_healthy
from schemas.events import Signal
from streams.keys import Keys
from streams.pg import create_pool
from streams.signals import SignalStore
from tickwave.servers import free_port

STRATEGY = "volume_wave"
PATH = f"/api/signals/buy?strategy={STRATEGY}"


def make_signals(n: int) -> list[Signal]:
    """n buy signals on distinct codes, with the fields a real list carries (names, reasons)."""
    rng = random.Random(1)
    boards = [(600000, "SH"), (1, "SZ"), (300001, "SZ"), (688001, "SH")]
    out = []
    for i in range(n):
        start, exchange = boards[i % len(boards)]
        code = f"{start + i // len(boards):06d}.{exchange}"
        out.append(Signal(strategy=STRATEGY, ts_code=code, name=f"股票{i:04d}", side="buy",
                          signal_date=date(2026, 11, 30) - timedelta(days=i % 5),
                          signal_price=round(rng.uniform(3, 300), 2), confidence=round(rng.random(), 3),
                          reason="放量突破 20 日均线"))
    return out


def start_edge(rurl: str, dsn: str, keys: Keys, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REDIS_URL": rurl, "DATABASE_URL": dsn, "TICKWAVE_KEY_PREFIX": keys.prefix,
           "TICKWAVE_EDGE_PORT": str(port), "TICKWAVE_EDGE_HOST": "127.0.0.1", "TICKWAVE_EDGE_NODE": "bench-signals",
           "TICKWAVE_LOG_LEVEL": "WARNING"}
    return subprocess.Popen([sys.executable, "-m", "tickwave", "edge"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def timed_gets(session: aiohttp.ClientSession, url: str, n: int, body: bytes | None = None) -> list[float]:
    """ms per request, one after another; each body checked against `body` when given."""
    out = []
    for _ in range(n):
        started = time.perf_counter()
        async with session.get(url) as r:
            got = await r.read()
        out.append((time.perf_counter() - started) * 1000)
        if r.status != 200 or (body is not None and got != body):
            raise RuntimeError(f"{url} answered {r.status} with another body")
    return out


async def after_changes(session: aiohttp.ClientSession, url: str, store: SignalStore, n: int,
                        body: bytes) -> list[float]:
    """ms per request when a change committed just before each (to another strategy, so the
    body stays the same): the edge rebuilds the list every time, the worst case."""
    out = []
    for i in range(n):
        await store.add(Signal(strategy="other", ts_code="600519.SH", signal_date=date(2026, 11, 30),
                               signal_price=100 + i % 2))
        out += await timed_gets(session, url, 1, body)
    return out


async def raw_fetch_ms(dsn: str, n: int) -> list[float]:
    """ms per raw asyncpg fetch of the same rows on one open connection: the database's floor."""
    conn = await asyncpg.connect(dsn)
    try:
        out = []
        for _ in range(n):
            started = time.perf_counter()
            await conn.fetch("SELECT strategy, ts_code, name, side, signal_date, signal_price, confidence, reason "
                             "FROM signals WHERE strategy = $1 AND side = 'buy' ORDER BY signal_date DESC, ts_code",
                             STRATEGY)
            out.append((time.perf_counter() - started) * 1000)
        return out
    finally:
        await conn.close()


async def main(signals: int, requests: int) -> None:
    with redis_url() as rurl, database_url() as purl:
        async with scratch_schema(purl) as dsn:
            pool = await create_pool(dsn)
            store = SignalStore(pool)
            await store.import_signals(make_signals(signals))
            keys = fresh_keys()
            ours_port, base_port = free_port(), free_port()
            edge = start_edge(rurl, dsn, keys, ours_port)
            base = None
            try:
                await wait_healthy(ours_port, edge)
                async with aiohttp.ClientSession() as session:
                    async with session.get(f"http://127.0.0.1:{ours_port}{PATH}") as r:
                        body = await r.read()
                        assert r.status == 200 and body.count(b'"ts_code"') == signals, "the list is not complete"
                    with tempfile.NamedTemporaryFile(suffix=".json") as f:
                        f.write(body)
                        f.flush()
                        base = subprocess.Popen(
                            [sys.executable, "-m", "bench.edge_baselines.plain_http_server", str(base_port), f.name],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        await wait_healthy(base_port, base)
                    ours_url, base_url = f"http://127.0.0.1:{ours_port}{PATH}", f"http://127.0.0.1:{base_port}{PATH}"
                    await timed_gets(session, ours_url, 300, body)  # warm both: connections, caches, JIT-free paths
                    await timed_gets(session, base_url, 300, body)
                    ours: list[float] = []
                    bare: list[float] = []
                    rounds = 6
                    for _ in range(rounds):
                        ours += await timed_gets(session, ours_url, requests // rounds, body)
                        bare += await timed_gets(session, base_url, requests // rounds, body)
                    changed = await after_changes(session, ours_url, store, requests // 3, body)
                raw = await raw_fetch_ms(dsn, requests)
            finally:
                await pool.close()
                stop(edge)
                if base is not None:
                    stop(base)
        print(f"bench/signals_api  {time.strftime('%Y-%m-%d %H:%M')}  signals={signals} requests={len(ours)} "
              f"body={len(body):,} bytes")
        for name, p in (("p50", 0.50), ("p99", 0.99)):
            print(line(f"GET /api/signals/buy {name}", percentile(ours, p), "ms", percentile(bare, p),
                       "bare aiohttp, same JSON from memory"))
        print(f"right after a change (list rebuilt per request): p50 {percentile(changed, 0.5):.2f} ms, "
              f"p99 {percentile(changed, 0.99):.2f} ms  ({len(changed)} requests)")
        print(f"raw asyncpg fetch of the {signals} rows: p50 {percentile(raw, 0.5):.2f} ms, "
              f"p99 {percentile(raw, 0.99):.2f} ms")
        print(f"target p99 <= 5 ms: {'met' if percentile(ours, 0.99) <= 5 else 'NOT met'}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.signals_api", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--signals", type=int, default=500)
    p.add_argument("--requests", type=int, default=3000)
    return p


if __name__ == "__main__":
    args = parser().parse_args()
    asyncio.run(main(args.signals, args.requests))
