"""The K-line bars: 1-minute bars of every stock from the ticks topic, in the worker app.

They are made in the join agent's loop, from the batches of ticks it takes (agents/worker.py
calls what `install` returns before it acks a batch): a second faust agent on the same topic
paid faust's per-message delivery and stream iteration a second time, about 100 µs of worker
CPU per tick at 2,000 ticks/s (bench/analytics.py, docs/benchmarks.md).

The open bar of each stock lives in the faust table `kline-bars` (ts_code -> the state of
agents/klines.py), a plain table keyed by stock rather than faust's tumbling-window table:
- a bar must close within milliseconds of its minute's end, and a windowed table closes
  windows (`on_window_close`) only from its cleanup timer, every `table_cleanup_interval`;
- a key per stock keeps the changelog at one live key per stock (recovery replays the
  newest value of 5,000 keys, not one per stock-minute), and the state carries what the
  session clock needs (baselines of the cumulative fields, the last bar closed) that a
  window of one minute does not;
- keyed by ts_code like the ticks, its changelog is co-partitioned with them: a stock's
  state moves with its ticks partition between workers and is recovered from the changelog.

A bar closes when a tick of a later minute comes, or when its partition's clock passes the
minute's end (+ grace): the clock is the newest tick time read from the partition, and
between ticks the timer moves it on by wall time, once the partition is read to its end.

Exactly once: ticks are read at-least-once. The state records the offset of the last tick
applied per stock, so a changelog that ran ahead of the committed offsets is not applied
twice (faust flushes the changelog before it commits, so it is never behind). Closed bars
are appended (streams/append_bars.lua, fenced by the bar's start) before the state without
them is written to the table, so a bar is never lost, and a replay appends nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import faust
import mode
from prometheus_client import Counter, Gauge, Histogram

from agents.join import BadTick, parse_tick
from agents.klines import State, apply_tick, close_bar, due_ms, open_bar
from agents.settings import WorkerSettings
from schemas.klines import Bar, SessionMode, bar_deadline
from streams.connection import AnyRedis
from streams.errors import StreamsError, StreamUnavailable
from streams.keys import Keys
from streams.klines import BarLog
from streams.partition import partition_for

log = logging.getLogger("tickwave.klines")

TABLE = "kline-bars"

BARS = Counter("tickwave_kline_bars_total", "1-minute bars appended to the bar streams", ["closed_by"])
TICKS = Counter("tickwave_kline_ticks_total", "Ticks read by the K-line agent, by what became of them", ["taken"])
CLOSE_LATENCY = Histogram(
    "tickwave_kline_close_latency_seconds", "A bar's last moment (its minute's end, plus the closing prints' "
    "minute for 11:29 and 14:59) to the bar appended",
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
OPEN_BARS = Gauge("tickwave_kline_open_bars", "Stocks with an open 1-minute bar in this worker's partitions")
LIVE_BARS = Counter("tickwave_kline_live_bars_total", "Live partial 1-minute bars published (at most one per "
                    "stock per TICKWAVE_KLINE_LIVE_S)")
APPEND_RETRIES = Counter("tickwave_kline_append_retries_total", "Bar appends retried after Redis was unavailable")

Record = tuple[int, int, bytes | None, bytes | None]  # partition, offset, key, value


class Klines:
    """The agent's work apart from faust: apply ticks, close bars by the clock, append, save.

    `load(code)` reads a stock's state from the table, `save(partition, code, state)` writes it
    (and its changelog); both are the table's, given by the app."""

    def __init__(self, bars: BarLog, partitions: int, *, mode: SessionMode, grace_ms: int,
                 load: Callable[[str], State | None], save: Callable[[int, str, State], Awaitable[None]],
                 stored: Callable[[], Iterable[tuple[str, State]]]):
        self.bars, self.partitions, self.mode, self.grace_ms = bars, partitions, mode, grace_ms
        self.load, self.save, self.stored = load, save, stored
        self.lock = asyncio.Lock()
        self.clock: dict[int, int] = {}  # partition -> newest tick time read (ms)
        self.seen_at: dict[int, float] = {}  # partition -> wall time (s) its clock last moved
        self.processed: dict[int, int] = {}  # partition -> last offset applied
        self.open: dict[int, dict[str, int]] = {}  # partition -> code -> when its open bar is due (ms)
        self.live: dict[int, set[str]] = {}  # partition -> codes whose open bar changed since last published
        self.stopping = False

    def forget(self, keep: set[int]) -> None:
        """Drop what is known of partitions this worker no longer holds."""
        for known in (self.clock, self.seen_at, self.processed, self.open, self.live):
            for p in [p for p in known if p not in keep]:
                del known[p]

    def _open_of(self, partition: int) -> dict[str, int]:
        """The open bars of a partition, from the table the first time (after an assignment)."""
        if partition not in self.open:
            due: dict[str, int] = {}
            newest = 0
            for code, state in self.stored():
                if partition_for(code, self.partitions) == partition and state:
                    newest = max(newest, state.get("t") or 0)
                    when = due_ms(state, self.grace_ms, self.mode)
                    if when is not None:
                        due[code] = when
            self.open[partition] = due
            if partition not in self.clock and newest:
                self.clock[partition], self.seen_at[partition] = newest, time.time()
        return self.open[partition]

    async def apply(self, records: Sequence[Record]) -> int:
        """Apply a batch of tick records; returns how many bars were appended."""
        async with self.lock:
            changed: dict[str, tuple[int, State]] = {}
            closing: dict[int, list[Bar]] = {}
            taken: dict[str, int] = {}
            for partition, offset, _key, value in records:
                try:
                    tick = parse_tick(value)
                except BadTick:
                    taken["bad"] = taken.get("bad", 0) + 1  # the join dead-letters it
                    continue
                code = tick.ts_code
                before = changed[code][1] if code in changed else self.load(code)
                out = apply_tick(before, tick, offset, self.mode)
                taken[out.taken] = taken.get(out.taken, 0) + 1
                if out.taken == "duplicate":
                    continue
                changed[code] = (partition, out.state)
                closing.setdefault(partition, []).extend(out.closed)
                ms = int(tick.time.timestamp() * 1000)
                if ms > self.clock.get(partition, 0):
                    self.clock[partition], self.seen_at[partition] = ms, time.time()
                if offset > self.processed.get(partition, -1):
                    self.processed[partition] = offset
            for name, n in taken.items():
                TICKS.labels(name).inc(n)
            for code, (partition, state) in changed.items():
                due = self._open_of(partition)
                when = due_ms(state, self.grace_ms, self.mode)
                if when is None:
                    due.pop(code, None)
                else:
                    due[code] = when
            appended = await self._append(closing, "tick")
            # the clock moved: close the partition's other bars it passed
            swept = {p: self._sweep(p, self.clock[p], changed) for p in {p for p, _ in changed.values()}}
            appended += await self._append({p: b for p, b in swept.items() if b}, "clock")
            await self._saved(changed)
            return appended

    async def _saved(self, changed: dict[str, tuple[int, State]]) -> None:
        """Write the changed states, and note whose open bar changed for the live stream."""
        for code, (partition, state) in changed.items():
            await self.save(partition, code, state)
            live = self.live.setdefault(partition, set())
            if state.get("bar"):
                live.add(code)
            else:
                live.discard(code)

    async def publish_live(self) -> int:
        """Publish the open bars that changed since the last call, one entry per partition (so
        each stock's partial bar goes out at most once per call); returns how many."""
        async with self.lock:  # held: a partial bar is published before its bar's close is
            pending, self.live = self.live, {}
            out = {p: [b for b in (open_bar(c, self.load(c)) for c in sorted(codes)) if b is not None]
                   for p, codes in pending.items() if codes}
            try:
                await asyncio.gather(*(self.bars.publish_open(p, bars) for p, bars in out.items() if bars))
            except StreamUnavailable:
                return 0  # a partial bar is superseded by the next one: nothing to hold
        n = sum(map(len, out.values()))
        if n:
            LIVE_BARS.inc(n)
        return n

    def _sweep(self, partition: int, clock_ms: int, changed: dict[str, tuple[int, State]]) -> list[Bar]:
        """Close the partition's bars due by `clock_ms`; their new states go into `changed`."""
        due = self._open_of(partition)
        out = []
        for code in [c for c, when in due.items() if when <= clock_ms]:
            state = changed[code][1] if code in changed else self.load(code)
            del due[code]
            if not state:
                continue
            state, bar = close_bar(code, state)
            if bar is not None:
                out.append(bar)
                changed[code] = (partition, state)
        return out

    async def tick_clock(self, caught_up: Callable[[list[int]], Any]) -> int:
        """Close the bars of quiet partitions whose clock, moved on by wall time, passed them.
        `caught_up(partitions)` answers which partitions have no unread ticks (awaitable)."""
        now = time.time()
        candidates = []
        for p in list(self.open):
            due = self.open[p]
            if due and p in self.clock:
                estimate = self.clock[p] + int((now - self.seen_at[p]) * 1000)
                if min(due.values()) <= estimate:
                    candidates.append(p)
        if not candidates:
            return 0
        ready = await caught_up(candidates)
        async with self.lock:
            changed: dict[str, tuple[int, State]] = {}
            swept = {}
            now = time.time()
            for p in ready:
                if p in self.clock:
                    estimate = self.clock[p] + int((now - self.seen_at[p]) * 1000)
                    swept[p] = self._sweep(p, estimate, changed)
            appended = await self._append({p: b for p, b in swept.items() if b}, "clock")
            await self._saved(changed)
            return appended

    async def _append(self, closing: dict[int, list[Bar]], closed_by: str) -> int:
        results = await asyncio.gather(*(self._append_one(p, bars) for p, bars in closing.items() if bars))
        appended_at = time.time()
        total = 0
        for bars, ids in zip([b for b in closing.values() if b], results):
            for bar, eid in zip(bars, ids):
                if eid is not None:
                    total += 1
                    end = bar_deadline(bar.start, self.mode).timestamp()
                    CLOSE_LATENCY.observe(max(0.0, appended_at - end))
        if total:
            BARS.labels(closed_by).inc(total)
        return total

    async def _append_one(self, partition: int, bars: list[Bar]) -> list[str | None]:
        """Append, holding the batch through a Redis outage (its ticks are not acked meanwhile)."""
        backoff = 0.1
        while True:
            try:
                return await self.bars.append(partition, bars)
            except StreamUnavailable as exc:
                APPEND_RETRIES.inc()
                if backoff == 0.1:
                    log.warning("redis unavailable; holding the bars", extra={"partition": partition,
                                                                              "error": str(exc)})
                if self.stopping:
                    raise
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)


def install(app: faust.App, ticks: faust.TopicT, settings: WorkerSettings, partitions: int,
            client: Callable[[], AnyRedis]) -> Callable[[Sequence[Record]], Awaitable[int]]:
    """Add the K-line table and its clock timer to the worker app; returns what the join agent
    calls with each batch of tick records it took (before it acks them). `client()` gives the
    worker's Redis client (made inside its loop)."""
    table = app.Table(TABLE, default=None, partitions=partitions)
    for closed_by in ("tick", "clock"):
        BARS.labels(closed_by)  # exported at 0 from the start: a rate has two samples once bars come
    state: dict[str, Klines] = {}

    async def save(partition: int, code: str, value: State) -> None:
        # not table[code] = value: a timer has no current event to take the partition from
        table.data[code] = value
        key_partition = getattr(table.data, "_key_partition", None)
        if key_partition is not None:  # the memory store forgets revoked partitions' keys by it
            key_partition[code] = partition
        # the changelog record as table.send_changelog makes it, queued on the producer itself:
        # faust's Topic.send_soon path (a FutureMessage, its buffer and callbacks) cost about a
        # tenth of the worker's CPU at one record per tick (py-spy, bench/analytics.py). Queued
        # before the batch is acked, and faust flushes the producer before it commits.
        topic = table.changelog_topic
        key, _ = topic.prepare_key(code, table.key_serializer)  # type: ignore[attr-defined]  # on Collection, not TableT
        data, _ = topic.prepare_value(value, table.value_serializer)  # type: ignore[attr-defined]
        await app.producer.send(topic.get_topic_name(), key, data, partition, None, None)

    def klines() -> Klines:
        if "k" not in state:
            bars = BarLog(client(), Keys(settings.key_prefix), maxlen=settings.kline_maxlen,
                          hold=bool(settings.archive_group))
            state["k"] = Klines(bars, partitions, mode=settings.kline_sessions, grace_ms=settings.kline_grace_ms,
                                load=lambda code: table.data.get(code), save=save,
                                stored=lambda: list(table.data.items()))
        return state["k"]

    async def apply(records: Sequence[Record]) -> int:
        return await klines().apply(records)

    async def caught_up(candidates: list[int]) -> list[int]:
        k = klines()
        tps = {tp.partition: tp for tp in app.consumer.assignment() if tp.topic == ticks.get_topic_name()}
        wanted = [tps[p] for p in candidates if p in tps]
        if not wanted:
            return []
        marks = await app.consumer.highwaters(*wanted)
        ready = []
        for tp, high in marks.items():
            done = k.processed.get(tp.partition)
            # nothing read since the assignment: where the consumer stands (the committed offset)
            position = done + 1 if done is not None else (await app.consumer.position(tp) or 0)
            if position >= high:
                ready.append(tp.partition)
        return ready

    published = [0.0]  # monotonic time the live partial bars were last published

    @app.timer(interval=settings.kline_timer_s)
    async def kline_clock(app: faust.App) -> None:
        if app.rebalancing or not app.consumer.assignment():
            return
        k = klines()
        k.forget({tp.partition for tp in app.consumer.assignment() if tp.topic == ticks.get_topic_name()})
        try:
            await k.tick_clock(caught_up)
            now = time.monotonic()
            if settings.kline_live_s and now - published[0] >= settings.kline_live_s:
                published[0] = now
                await k.publish_live()
        except StreamsError as exc:
            # an exception in a faust timer crashes the worker: a Redis outage only delays a close
            log.info("bars not closed by the clock: redis unavailable", extra={"error": str(exc)})
        OPEN_BARS.set(sum(len(d) for d in k.open.values()))

    @app.service
    class KlineCloser(mode.Service):
        """Stops the append retries when the worker stops."""

        async def on_stop(self) -> None:
            if "k" in state:
                state["k"].stopping = True

    return apply

