"""Helpers for the signals tests: relay processes, the outbox as PostgreSQL holds it, the
signals topic as Redis holds it, and the exact comparison of the two."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg

from schemas.events import Signal
from streams.codec import Record
from streams.connection import AnyRedis
from streams.keys import Keys
from streams.partition import partition_for
from tests.driver_harness import read_topic

REPO = Path(__file__).resolve().parents[1]
PARTITIONS = 8


def sig(code: str, strategy: str = "volume_wave", price: float | None = 10.0, **over: Any) -> Signal:
    return Signal(strategy=strategy, ts_code=code, signal_date=over.pop("signal_date", date(2026, 11, 20)),
                  signal_price=price, **over)


def codes(n: int, start: int = 0) -> list[str]:
    """n distinct Shanghai main-board codes."""
    return [f"{600000 + i}.SH" for i in range(start, start + n)]


class OutboxRow(NamedTuple):
    id: int
    ts_code: str
    action: str
    change: str
    committed_ms: int


async def outbox(pg_url: str) -> list[OutboxRow]:
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT id, ts_code, action, change, "
                                "(extract(epoch FROM committed_at) * 1000)::bigint AS ms FROM signal_outbox ORDER BY id")
    finally:
        await conn.close()
    return [OutboxRow(r["id"], r["ts_code"], r["action"], r["change"], r["ms"]) for r in rows]


async def sql(pg_url: str, query: str, *args: Any) -> Any:
    conn = await asyncpg.connect(pg_url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def script(pg_url: str, statements: str) -> None:
    """Run several statements (DDL a test adds to its own schema)."""
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(statements)
    finally:
        await conn.close()


def header_id(record: Record) -> int:
    return int(dict(record.headers)["outbox_id"])


async def topic(redis: AnyRedis, keys: Keys) -> list[Record]:
    return await read_topic(redis, keys, "signals", PARTITIONS)


async def topic_count(redis: AnyRedis, keys: Keys) -> int:
    pipe = redis.pipeline(transaction=False)
    for p in range(PARTITIONS):
        pipe.xlen(keys.topic_partition("signals", p))
    return sum(await pipe.execute())


async def assert_topic_is_the_outbox(redis: AnyRedis, keys: Keys, pg_url: str) -> int:
    """Each partition holds exactly its outbox rows, in id order, once, with the contract's
    key, value, header and timestamp. Returns the number of rows."""
    rows = await outbox(pg_url)
    want: dict[int, list[tuple[int, bytes, bytes, int]]] = {p: [] for p in range(PARTITIONS)}
    for r in rows:
        want[partition_for(r.ts_code, PARTITIONS)].append((r.id, r.ts_code.encode(), r.change.encode(), r.committed_ms))
    got: dict[int, list[tuple[int, bytes, bytes, int]]] = {p: [] for p in range(PARTITIONS)}
    for rec in await topic(redis, keys):
        p = partition_for(rec.key or b"", PARTITIONS)
        got[p].append((header_id(rec), rec.key or b"", rec.value or b"", rec.timestamp_ms))
    for p in range(PARTITIONS):
        ids = [g[0] for g in got[p]]
        assert len(ids) == len(set(ids)), f"partition {p} repeats outbox ids: {sorted(i for i in ids if ids.count(i) > 1)[:10]}"
        assert ids == sorted(ids), f"partition {p} is out of id order"
        missing = sorted({w[0] for w in want[p]} - set(ids))
        extra = sorted(set(ids) - {w[0] for w in want[p]})
        assert not missing and not extra, f"partition {p}: missing ids {missing[:10]}, extra ids {extra[:10]}"
        assert got[p] == want[p], f"partition {p}: records differ from the outbox rows"
    return len(rows)


class RelayProcess:
    """`python -m tickwave relay` in its own process, logging to a file."""

    def __init__(self, redis_url: str, pg_url: str, keys: Keys, workdir: Path, name: str, **env: str):
        self.name = name
        self.logfile = workdir / f"{name}.log"
        self.env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": pg_url, "TICKWAVE_KEY_PREFIX": keys.prefix,
                    "TICKWAVE_RELAY_METRICS_PORT": "0", "TICKWAVE_RELAY_STANDBY_S": "0.1",
                    "TICKWAVE_RELAY_POLL_S": "0.5", **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        with open(self.logfile, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "tickwave", "relay"], cwd=REPO, env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT)
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup; PostgreSQL sees the session end and frees the leadership."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise AssertionError(f"relay {self.name} did not stop within {timeout}s:\n{self.log()[-3000:]}")
        return int(self.proc.returncode)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def terms(self) -> int:
        """How many times this process took the lead (its log says so each time)."""
        return self.log().count("leading the signals relay")
