"""Market breadth's cost and freshness: one real `tickwave worker` on the whole market.

(a) the worker's CPU (percent of one core) while ticks of --stocks stocks arrive at --rate
    ticks/s for --seconds, with the breadth agent and table (TICKWAVE_WORKER_BREADTH=true)
    against the same worker and ticks without them (the join alone, no signals held: every
    tick is read and parsed, none joined), measured in the same run on fresh key prefixes;
(b) breadth complete after the last tick: from the last tick written to the `market` stream's
    newest entry holding it (its `all` amount equal to the sum of every stock's last amount),
    against the computation interval (TICKWAVE_BREADTH_INTERVAL_S, 3 s by default);
(c) the breadth table's changelog in Redis, bytes per tick, against the ticks topic's own.

    python -m bench.breadth [--stocks 5000] [--rate 2000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from faust.types import TP

from bench._common import cpu_seconds, drop_prefix, fresh_keys, line, redis_url
from schemas.events import Tick
from schemas.market import SHANGHAI, limit_band
from schemas.universe import default_universe
from streams.codec import EncodedRecord, decode_event, encode_record
from streams.connection import AnyRedis, connect
from streams.driver.group import tp_field
from streams.keys import Keys
from streams.log import PartitionLog
from streams.partition import partition_for
from streams.topics import declare

REPO = Path(__file__).resolve().parents[1]
PARTITIONS = 8
APP = "tickwave-join"
CHANGELOG = f"{APP}-breadth-by-code-changelog"


def progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


class Tape:
    """Ticks of `stocks` seasoned listings, inside their limit bands, amounts only growing."""

    def __init__(self, stocks: int, seed: int = 1):
        self.rng = random.Random(seed)
        day = datetime(2026, 11, 24, 9, 30, tzinfo=SHANGHAI)
        self.codes = [x.ts_code for x in default_universe() if x.list_date and x.list_date.year < 2026][:stocks]
        self.pre = {c: round(self.rng.uniform(3, 80), 2) for c in self.codes}
        self.band = {c: limit_band(c, "", p, day.date()) for c, p in self.pre.items()}
        self.amount = {c: 0.0 for c in self.codes}
        self.t0, self.n = day, 0

    def take(self, count: int) -> dict[int, list[EncodedRecord]]:
        out: dict[int, list[EncodedRecord]] = {}
        for _ in range(count):
            code = self.codes[self.n % len(self.codes)] if self.n < len(self.codes) else self.rng.choice(self.codes)
            band = self.band[code]
            price = round(self.rng.uniform(band.low, band.high), 2)
            self.amount[code] = round(self.amount[code] + self.rng.uniform(1e4, 1e6), 2)
            self.n += 1
            tick = Tick(ts_code=code, name="", time=self.t0 + timedelta(milliseconds=self.n), price=price,
                        pre_close=self.pre[code], amount=self.amount[code], source="bench")
            out.setdefault(partition_for(code, PARTITIONS), []).append(
                encode_record(code.encode(), tick.model_dump_json().encode()))
        return out

    def total_amount(self) -> float:
        return round(math.fsum(a for a in self.amount.values() if a), 2)


class Worker:
    def __init__(self, url: str, keys: Keys, workdir: Path, breadth: bool):
        env = {**os.environ, "REDIS_URL": url, "TICKWAVE_KEY_PREFIX": keys.prefix, "TICKWAVE_WORKER_METRICS_PORT": "0",
               "TICKWAVE_TICK_PARTITIONS": str(PARTITIONS), "TICKWAVE_WORKER_DATADIR": str(workdir / keys.prefix),
               "TICKWAVE_WORKER_BREADTH": "true" if breadth else "false"}
        env.pop("DATABASE_URL", None)
        self.log = workdir / f"{keys.prefix.strip(':')}.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "tickwave", "worker"], cwd=REPO, env=env,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


async def wait(check, timeout: float, what: str, worker: Worker) -> float:  # type: ignore[no-untyped-def]
    start = time.monotonic()
    while not await check():
        if worker.proc.poll() is not None:
            raise RuntimeError(f"the worker exited while waiting for {what}: {worker.log.read_text()[-2000:]}")
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


class Run:
    """One worker on a fresh prefix: paced ticks, its CPU while they are consumed."""

    def __init__(self, client: AnyRedis, url: str, workdir: Path, breadth: bool, args: argparse.Namespace):
        self.client, self.url, self.workdir, self.breadth, self.args = client, url, workdir, breadth, args
        self.keys = fresh_keys()
        self.tape = Tape(args.stocks)
        self.written = 0

    async def owns_all(self) -> bool:
        owners = await self.client.hgetall(self.keys.group(APP, "owners"))
        return sum(1 for f in owners if f.decode().startswith("ticks|")) == PARTITIONS

    async def caught_up(self) -> bool:
        fields = [tp_field(TP("ticks", p)) for p in range(PARTITIONS)]
        got = await self.client.hmget(self.keys.group(APP, "offsets"), fields)
        return sum(int(v) for v in got if v is not None) >= self.written

    async def write(self, count: int) -> None:
        await PartitionLog(self.client, self.keys, "ticks").append_many(self.tape.take(count))
        self.written += count

    async def breadth_holds_everything(self) -> bool:
        got = await self.client.xrevrange(self.keys.events("market"), count=1)
        if not got:
            return False
        event = decode_event(got[0][0], got[0][1])
        row = event.rows[0]  # type: ignore[union-attr]
        return row.count == len(self.tape.codes) and row.amount == self.tape.total_amount()

    async def __call__(self) -> dict[str, float]:
        await declare(self.client, self.keys, ["ticks", "signals"], partitions=PARTITIONS)
        worker = Worker(self.url, self.keys, self.workdir, self.breadth)
        try:
            await wait(self.owns_all, 120, "the worker holding the tick partitions", worker)
            # every stock once (the table full, the figures complete), then the paced load
            await self.write(len(self.tape.codes))
            await wait(self.caught_up, 120, "the warm-up ticks consumed", worker)
            pace = 0.05
            per_step = max(1, round(self.args.rate * pace))
            steps = max(1, round(self.args.seconds / pace))
            cpu0, wall0 = cpu_seconds(worker.proc.pid), time.monotonic()
            for i in range(steps):
                await self.write(per_step)
                await asyncio.sleep(max(0.0, wall0 + (i + 1) * pace - time.monotonic()))
            last_tick = time.monotonic()
            await wait(self.caught_up, 120, "the paced ticks consumed", worker)
            cpu = cpu_seconds(worker.proc.pid) - cpu0
            wall = time.monotonic() - wall0
            out = {"cpu": cpu / wall * 100, "ticks": float(steps * per_step), "wall": wall}
            if self.breadth:
                await wait(self.breadth_holds_everything, 60, "a breadth entry holding every tick", worker)
                out["complete_ms"] = (time.monotonic() - last_tick) * 1000
                changelog = sum([await self.client.memory_usage(self.keys.topic_partition(CHANGELOG, p)) or 0
                                 for p in range(PARTITIONS)])
                ticks = sum([await self.client.memory_usage(self.keys.topic_partition("ticks", p)) or 0
                             for p in range(PARTITIONS)])
                out["changelog_per_tick"] = changelog / self.written
                out["ticks_per_tick"] = ticks / self.written
            return out
        finally:
            worker.stop()
            await drop_prefix(self.client, self.keys)


async def main(args: argparse.Namespace) -> None:
    with redis_url() as url, tempfile.TemporaryDirectory(prefix="bench-breadth-") as tmp:
        client = connect(url)
        try:
            progress(f"join only: {args.stocks:,} stocks, {args.rate:,} ticks/s for {args.seconds} s")
            base = await Run(client, url, Path(tmp), False, args)()
            progress("join and breadth")
            with_b = await Run(client, url, Path(tmp), True, args)()
        finally:
            await client.aclose()
    interval = float(os.environ.get("TICKWAVE_BREADTH_INTERVAL_S", "3")) * 1000
    print(f"bench.breadth: {args.stocks:,} stocks, {args.rate:,} ticks/s for {args.seconds} s, "
          f"{PARTITIONS} partitions, one worker")
    print(line("(a) worker CPU, join and breadth", with_b["cpu"], "% of a core", base["cpu"], "join only"))
    print(line("(b) breadth complete after the last tick", with_b["complete_ms"], "ms", interval,
               "computation interval"))
    print(line("(c) breadth changelog per tick", with_b["changelog_per_tick"], "bytes", with_b["ticks_per_tick"],
               "ticks topic"))
    print(f"    {int(with_b['ticks']):,} paced ticks consumed in {with_b['wall']:.1f} s with breadth, "
          f"{int(base['ticks']):,} in {base['wall']:.1f} s without")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.breadth", description=__doc__.split("\n\n")[0])
    p.add_argument("--stocks", type=int, default=5000, help="stocks of the built-in universe that tick")
    p.add_argument("--rate", type=int, default=2000, help="ticks per second")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of paced ticks")
    return p


if __name__ == "__main__":
    asyncio.run(main(parser().parse_args()))
