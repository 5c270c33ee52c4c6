"""Helpers for the join tests: `tickwave worker` processes, signals and ticks written to their
topics, and the events a test expects, computed from the ticks and signals on their own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

from schemas.events import Signal, SignalChange, Tick
from schemas.market import SHANGHAI
from streams.codec import decode_event, encode_record
from streams.connection import AnyRedis
from streams.keys import Keys
from streams.log import PartitionLog
from streams.partition import partition_for
from streams.topics import declare

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 24, 9, 30, tzinfo=SHANGHAI)
# a short lease, so a killed worker's partitions move within a few seconds
BROKER_OPTIONS = "session_timeout=3&heartbeat_interval=0.5"


class JoinWorker:
    """`tickwave worker` in its own process, logging to a file."""

    def __init__(self, redis_url: str, keys: Keys, workdir: Path, name: str, **env: str):
        self.name = name
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.logfile = self.dir / "worker.log"
        self.env = {**os.environ, "REDIS_URL": redis_url, "TICKWAVE_KEY_PREFIX": keys.prefix,
                    "TICKWAVE_WORKER_METRICS_PORT": "0", "TICKWAVE_WORKER_BROKER_OPTIONS": BROKER_OPTIONS,
                    "TICKWAVE_WORKER_DATADIR": str(self.dir / "data"), "TICKWAVE_TICK_PARTITIONS": "4", **env}
        self.env.pop("DATABASE_URL", None)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> JoinWorker:
        self.starts += 1
        with open(self.logfile, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "tickwave", "worker"], cwd=REPO, env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no commit, no leave; only the lease tells the group."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"{self.name} did not stop within {timeout}s") from None
        return int(self.proc.returncode)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""


def make_signal(strategy: str, code: str, price: float) -> Signal:
    return Signal(strategy=strategy, ts_code=code, name="", signal_date=date(2026, 11, 20), signal_price=price)


async def topics(client: AnyRedis, keys: Keys, partitions: int = 4) -> None:
    await declare(client, keys, ["ticks", "signals"], partitions=partitions)


async def send_signal(client: AnyRedis, keys: Keys, change: SignalChange, outbox_id: int,
                      partitions: int = 4) -> None:
    """A signal change as the relay writes it: keyed by ts_code, stamped with its outbox id."""
    code = change.signal.ts_code
    await PartitionLog(client, keys, "signals").append(partition_for(code, partitions), [
        encode_record(code.encode(), change.model_dump_json().encode(), [("outbox_id", str(outbox_id).encode())])])


@dataclass(frozen=True)
class Written:
    partition: int
    offset: int
    tick: Tick


async def send_ticks(client: AnyRedis, keys: Keys, ticks: list[Tick], partitions: int = 4) -> list[Written]:
    """Append ticks the way ingest does; returns where each landed."""
    batches: dict[int, list[Tick]] = {}
    for tick in ticks:
        batches.setdefault(partition_for(tick.ts_code, partitions), []).append(tick)
    firsts = await PartitionLog(client, keys, "ticks").append_many({
        p: [encode_record(t.ts_code.encode(), t.model_dump_json().encode(), None, int(t.time.timestamp() * 1000))
            for t in ts] for p, ts in batches.items()})
    return [Written(p, firsts[p] + i, t) for p, ts in batches.items() for i, t in enumerate(ts)]


def tick(code: str, n: int, pre_close: float = 10.0) -> Tick:
    """The n-th tick of a stock: a price walking inside ±5 % of the previous close."""
    price = round(pre_close * (1 + ((n * 7919) % 101 - 50) / 1000), 2)
    return Tick(ts_code=code, name=f"name {code}", time=T0 + timedelta(milliseconds=n), price=price,
                pre_close=pre_close, volume=100 * n, source="test")


Key = tuple[str, int, int, str, float]  # strategy, tick partition, tick offset, ts_code, price


def expected_events(written: list[Written], held: dict[str, dict[str, float]]) -> set[Key]:
    """The events the join owes: one per strategy holding the stock of each tick (held: code ->
    strategy -> signal price), computed here without the join's code."""
    return {(strategy, w.partition, w.offset, w.tick.ts_code, w.tick.price)
            for w in written for strategy in held.get(w.tick.ts_code, {})}


async def stream_events(client: AnyRedis, keys: Keys, strategy: str) -> tuple[list[Key], list[str]]:
    """Every price event of a strategy's stream as keys (duplicates kept), and its signal event ids.
    Checks each event's figures against an independent computation from its tick."""
    out: list[Key] = []
    signal_ids: list[str] = []
    for eid, fields in await client.xrange(keys.events(strategy)):
        event = decode_event(eid, fields)
        if isinstance(event, SignalChange):
            signal_ids.append(eid.decode())
            continue
        expected_pct = (event.price - event.pre_close) / event.pre_close * 100
        assert abs(event.change_percent - expected_pct) < 1e-3, (event, expected_pct)
        if event.signal_price:
            since = (event.price - event.signal_price) / event.signal_price * 100
            assert event.change_since_signal_percent is not None
            assert abs(event.change_since_signal_percent - since) < 1e-3, (event, since)
        out.append((event.strategy, event.source_partition, event.source_offset, event.ts_code, event.price))
    return out, signal_ids
