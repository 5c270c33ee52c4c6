"""What bench.pipeline runs against: the market and its tick tape, a fresh key prefix with
`tickwave worker` processes (`Workers`) or with the raw baseline loop (`RawLoop`), and CPU
accounting of the processes involved."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, cast

import orjson
from redis.exceptions import ResponseError

from agents.join import parse_tick, price_changes, signals_of
from agents.settings import WorkerSettings
from agents.worker import Joiner
from bench._common import drop_prefix, fresh_keys
from bench.edge import stop as stop_process
from schemas.events import PriceChange, Signal, SignalChange
from schemas.market import SHANGHAI
from schemas.universe import Listing, default_universe
from streams.codec import EncodedRecord, decode_record_parts, encode_record, id_to_offset, record_generation
from streams.connection import connect
from streams.events import EventLog, RawEntry
from streams.keys import Keys
from streams.log import PartitionLog
from streams.partition import partition_for
from streams.topics import declare

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("volume_wave", "breakout", "dragon")
SIGNAL_DATE = date(2026, 11, 27)
STALL_S = 30.0  # nothing appended for this long while events are owed: the run fails


def progress(text: str) -> None:
    print(f"  {text}", file=sys.stderr, flush=True)


# --- the market ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Market:
    listings: list[Listing]
    held: dict[str, dict[str, Any]]  # ts_code -> strategy -> Signal as JSON data: the join table's value
    changes: list[SignalChange]

    def events_of(self, code: str) -> int:
        return len(self.held.get(code, ()))


def make_market(stocks: int, signalled: int) -> Market:
    """`stocks` listings of the built-in universe; every (stocks/signalled)-th of them signalled by
    one strategy in turn, one in five of those by the next strategy too."""
    listings = default_universe().pick(stocks)
    held: dict[str, dict[str, Any]] = {}
    changes = []
    for i in range(signalled):
        listing = listings[i * stocks // signalled]
        assert listing.pre_close is not None
        names = [STRATEGIES[i % 3]] + ([STRATEGIES[(i + 1) % 3]] if i % 5 == 0 else [])
        for strategy in names:
            signal = Signal(strategy=strategy, ts_code=listing.ts_code, name=listing.name, signal_date=SIGNAL_DATE,
                            signal_price=round(listing.pre_close * 0.97, 2))
            changes.append(SignalChange(action="add", signal=signal))
            held.setdefault(listing.ts_code, {})[strategy] = signal.model_dump(mode="json")
    return Market(listings, held, changes)


TapeTick = tuple[int, int, str, bytes]  # partition, offset, ts_code, tick JSON


class Tape:
    """The market's ticks in code order, round after round, each price within ±5 % of the
    previous close; knows the offset each tick gets in its partition (the append script hands
    out dense offsets from 0, and the tape's key prefix has no other tick writer)."""

    def __init__(self, market: Market, partitions: int):
        self.market = market
        self.stocks = [(x.ts_code, x.name, float(x.pre_close or 10.0), partition_for(x.ts_code, partitions))
                       for x in market.listings]
        self.offsets = [0] * partitions
        self.made = 0

    def stamp(self) -> str:
        """The time the next batch's ticks carry: now."""
        return datetime.now(SHANGHAI).isoformat()

    def traded(self, i: int, n: int, price: float) -> dict[str, float]:
        """The cumulative fields of tick `n` (of stock `i`): a volume that grows round by round."""
        return {"volume": 100 * (n // len(self.stocks) + 1)}

    def take(self, count: int) -> list[TapeTick]:
        """The next `count` ticks, stamped with `stamp()`."""
        stamp = self.stamp()
        out = []
        for _ in range(count):
            n = self.made
            i = n % len(self.stocks)
            code, name, pre_close, p = self.stocks[i]
            price = round(pre_close * (1 + ((n * 7919) % 101 - 50) / 1000), 2)
            value = orjson.dumps({"ts_code": code, "name": name, "time": stamp, "price": price,
                                  "pre_close": pre_close, **self.traded(i, n, price), "source": "bench"})
            out.append((p, self.offsets[p], code, value))
            self.offsets[p] += 1
            self.made += 1
        return out

    def events_for(self, ticks: Sequence[TapeTick]) -> int:
        return sum(self.market.events_of(code) for _, _, code, _ in ticks)


def encoded(ticks: Sequence[TapeTick]) -> dict[int, list[EncodedRecord]]:
    ms = int(time.time() * 1000)
    out: dict[int, list[EncodedRecord]] = defaultdict(list)
    for p, _offset, code, value in ticks:
        out[p].append(encode_record(code.encode(), value, None, ms))
    return out


# --- where ticks go in and events come out -------------------------------------------------

class Target:
    """One key prefix with its topics declared: ticks go in, strategy events come out."""

    label = ""

    def __init__(self, url: str, market: Market, partitions: int):
        self.url, self.market, self.partitions = url, market, partitions
        self.keys = fresh_keys()
        self.client = connect(url)
        self.tape = Tape(market, partitions)
        self.ticks = PartitionLog(self.client, self.keys, "ticks")
        self.events = EventLog(self.client, self.keys)

    async def __aenter__(self) -> Target:
        await declare(self.client, self.keys, ["ticks", "signals"], partitions=self.partitions)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await drop_prefix(self.client, self.keys)
        await self.client.aclose()

    def pids(self) -> dict[str, int]:
        return {}

    async def rebalances(self) -> int:
        """Rebalance rounds the workers' group has started so far (none without workers)."""
        return 0

    def check(self) -> None:
        """Raise when a process of this target has died."""

    def failed(self, reason: str) -> RuntimeError:
        return RuntimeError(f"{self.label}: {reason}")

    async def count(self) -> int:
        """Entries in the strategy streams (signal changes included)."""
        pipe = self.client.pipeline(transaction=False)
        for s in STRATEGIES:
            pipe.xlen(self.keys.events(s))
        return sum(await pipe.execute())

    async def wait_count(self, want: int, what: str) -> None:
        best, progressed, printed = -1, time.monotonic(), 0.0
        while True:
            self.check()
            n = await self.count()
            now = time.monotonic()
            if n >= want:
                return
            if n > best:
                best, progressed = n, now
            elif now - progressed > STALL_S:
                raise self.failed(f"nothing appended for {STALL_S:.0f} s while {what} ({n:,}/{want:,} entries)")
            if now - printed > 1.0:
                progress(f"{self.label}: {what}, {n:,}/{want:,} stream entries")
                printed = now
            await asyncio.sleep(0.02)

    async def write_ticks(self, ticks: Sequence[TapeTick]) -> None:
        await self.ticks.append_many(encoded(ticks))

    async def write_events(self, ticks: Sequence[TapeTick]) -> None:
        """The events these ticks owe, computed by the bench with agents.join's functions and
        appended straight to the strategy streams: the path without the join worker."""
        now = datetime.now(SHANGHAI)
        by_strategy: dict[str, list[PriceChange]] = defaultdict(list)
        for p, offset, code, value in ticks:
            held = self.market.held.get(code)
            if held:
                for change in price_changes(parse_tick(value), signals_of(held), ingest_time=now,
                                            partition=p, offset=offset):
                    by_strategy[change.strategy].append(change)
        await asyncio.gather(*(self.events.append_events(s, b) for s, b in by_strategy.items()))


class WorkerProc:
    """`tickwave worker` in its own process, logging to a file in the bench's work directory."""

    def __init__(self, url: str, keys: Keys, partitions: int, workdir: Path, name: str,
                 extra_env: dict[str, str] | None = None):
        self.name = name
        self.logfile = workdir / f"{name}.log"
        env = {**os.environ, "REDIS_URL": url, "TICKWAVE_KEY_PREFIX": keys.prefix,
               "TICKWAVE_WORKER_METRICS_PORT": "0", "TICKWAVE_TICK_PARTITIONS": str(partitions),
               "TICKWAVE_WORKER_DATADIR": str(workdir / name), **(extra_env or {})}
        env.pop("DATABASE_URL", None)
        with open(self.logfile, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "tickwave", "worker"], cwd=REPO, env=env,
                                         stdout=out, stderr=subprocess.STDOUT)

    def tail(self) -> str:
        return self.logfile.read_bytes()[-3000:].decode(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)


class Workers(Target):
    """`n` join workers on a fresh prefix, holding their partitions, with every signal applied."""

    def __init__(self, url: str, market: Market, partitions: int, n: int, workdir: Path,
                 extra_env: dict[str, str] | None = None):
        """`extra_env`: settings of the worker processes beyond the bench's (e.g. TICKWAVE_KLINE_ENABLED)."""
        super().__init__(url, market, partitions)
        self.n, self.workdir, self.extra_env = n, workdir, extra_env
        self.label = "one worker" if n == 1 else f"{n} workers"
        self.procs: list[WorkerProc] = []

    async def __aenter__(self) -> Workers:
        await super().__aenter__()
        started = time.monotonic()
        tag = self.keys.prefix.split(":")[1]
        self.procs = [WorkerProc(self.url, self.keys, self.partitions, self.workdir, f"worker-{tag}-{i}",
                                self.extra_env) for i in range(self.n)]
        await self.wait(self.all_own_partitions, 120, "the workers never held the tick partitions")
        await self.send_signals()
        await self.wait(self.signals_applied, 60, "the signals were never applied")
        self.split = "+".join(str(n) for n in await self.tick_partitions())
        progress(f"{self.label}: up, {len(self.market.changes)} signals applied, tick partitions {self.split}, "
                 f"{time.monotonic() - started:.1f} s after start")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.stop()
        await super().__aexit__(*exc)

    def pids(self) -> dict[str, int]:
        return {f"worker {i + 1}" if self.n > 1 else "worker": p.proc.pid for i, p in enumerate(self.procs)}

    def check(self) -> None:
        for p in self.procs:
            if p.proc.poll() is not None:
                raise self.failed(f"{p.name} exited with {p.proc.returncode}")

    def failed(self, reason: str) -> RuntimeError:
        tails = "".join(f"\n--- the end of {p.logfile}:\n{p.tail()}" for p in self.procs)
        return RuntimeError(f"{self.label}: {reason}{tails}")

    async def wait(self, ready: Callable[[], Awaitable[bool]], timeout: float, reason: str) -> None:
        deadline = time.monotonic() + timeout
        while not await ready():
            self.check()
            if time.monotonic() > deadline:
                raise self.failed(reason)
            await asyncio.sleep(0.1)

    async def rebalances(self) -> int:
        app_id = WorkerSettings().worker_app_id
        return int(await self.client.hget(self.keys.group(app_id, "meta"), "round") or 0)

    async def tick_partitions(self) -> list[int]:
        """How many tick partitions each worker holds now."""
        app_id = WorkerSettings().worker_app_id
        owners = cast(dict[bytes, bytes], await self.client.hgetall(self.keys.group(app_id, "owners")))
        ticks = [v.decode() for k, v in owners.items() if k.startswith(b"ticks|")]
        return [sum(f"-{p.proc.pid}-" in owner for owner in ticks) for p in self.procs]

    async def all_own_partitions(self) -> bool:
        return min(await self.tick_partitions()) > 0

    async def signals_applied(self) -> bool:
        return await self.count() >= len(self.market.changes)

    async def send_signals(self) -> None:
        """As the outbox relay writes them (tests/join_harness.py `send_signal`): keyed by ts_code,
        stamped with an outbox id, in outbox order within each partition."""
        batches: dict[int, list[EncodedRecord]] = defaultdict(list)
        for outbox_id, change in enumerate(self.market.changes, 1):
            code = change.signal.ts_code
            batches[partition_for(code, self.partitions)].append(encode_record(
                code.encode(), change.model_dump_json().encode(), [("outbox_id", str(outbox_id).encode())]))
        await PartitionLog(self.client, self.keys, "signals").append_many(batches)


def raw_process(url: str, prefix: str, partitions: list[int], held: dict[str, dict[str, Any]],
                ready: Any, stop_flag: Any) -> None:
    """The baseline's body, in a process of its own (multiprocessing target)."""
    asyncio.run(raw_loop(url, Keys(prefix), partitions, held, ready, stop_flag))


async def raw_loop(url: str, keys: Keys, partitions: list[int], held: dict[str, dict[str, Any]],
                   ready: Any, stop_flag: Any) -> None:
    """XREADGROUP COUNT 1000 over these tick partitions (blocking 100 ms when idle), the batch
    joined by the worker's `Joiner.join_ticks` with `held` as the table, XACK; until told to stop."""
    client = connect(url)
    joiner = Joiner(client, keys, EventLog(client, keys))
    streams = {keys.topic_partition("ticks", p): p for p in partitions}
    for key in streams:
        try:
            await client.xgroup_create(key, "raw", id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
    read = {key: ">" for key in streams}
    await joiner.events.ping()
    ready.release()
    try:
        while not stop_flag.is_set():
            reply = cast(list[tuple[bytes, list[RawEntry]]],
                         await client.xreadgroup("raw", "raw", read, count=1000, block=100))  # type: ignore[arg-type]
            records = []
            acks = client.pipeline(transaction=False)
            for raw_key, entries in reply or []:
                key = raw_key.decode()
                p = streams[key]
                for entry_id, fields in entries:
                    k, v, _headers, _ts = decode_record_parts(fields)
                    records.append((p, id_to_offset(entry_id), k, v, record_generation(fields)))
                acks.xack(key, "raw", *[entry_id for entry_id, _ in entries])
            if records:
                await joiner.join_ticks(records, held.get)
                await acks.execute()
    finally:
        await client.aclose()


class RawLoop(Target):
    """The baseline: `procs` raw loop processes on a fresh prefix, the partitions split between them."""

    def __init__(self, url: str, market: Market, partitions: int, procs: int):
        super().__init__(url, market, partitions)
        self.label = "raw loop" if procs == 1 else f"raw loop x{procs}"
        ctx = multiprocessing.get_context("spawn")
        self.stop_flag = ctx.Event()
        self.ready = ctx.Semaphore(0)  # released by each process once its groups exist
        self.procs = [ctx.Process(target=raw_process, daemon=True, args=(
            url, self.keys.prefix, [p for p in range(partitions) if p % procs == i], market.held, self.ready,
            self.stop_flag))
            for i in range(procs)]

    async def __aenter__(self) -> RawLoop:
        await super().__aenter__()
        for proc in self.procs:
            proc.start()
        # timed ticks must not wait for a process still importing: each says when it reads
        loop = asyncio.get_running_loop()
        for _ in self.procs:
            if not await loop.run_in_executor(None, self.ready.acquire, True, 60):
                self.check()
                raise self.failed("a raw loop process was not reading after 60 s")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop_flag.set()
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        await super().__aexit__(*exc)

    def pids(self) -> dict[str, int]:
        return {f"raw {i + 1}" if len(self.procs) > 1 else "raw": p.pid for i, p in enumerate(self.procs)
                if p.pid is not None}

    def check(self) -> None:
        for p in self.procs:
            if not p.is_alive():
                raise self.failed(f"a raw loop process exited with {p.exitcode}")
