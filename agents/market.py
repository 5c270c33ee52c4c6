"""The market breadth agent and timer, added to the worker's faust app (agents/worker.py).

- The `breadth` agent reads the ticks topic (beside the join) and keeps each stock's latest
  state for the day in the `breadth-by-code` table, keyed by ts_code: its changelog partition
  is the tick's, so the table is partitioned like ticks, recovers from its changelog after a
  restart and moves with its partitions between workers.
- Every `breadth_interval_s` each worker writes the partial of every ticks partition it owns
  to Redis (streams/breadth.py: only forward, by tick offset); the worker owning ticks
  partition 0 reads them all, combines them (agents/breadth.py: exact) and appends one
  Breadth to the `market` stream through `EventLog.append_events`, positioned by interval
  number, so two workers that both believe they hold partition 0 write one entry per interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

import faust
import mode
from prometheus_client import Counter, Gauge, Histogram

from agents.breadth import P, combine, newer, partials, signature, stock_state
from agents.join import BadTick, parse_tick
from agents.settings import WorkerSettings
from schemas.market import SHANGHAI
from schemas.universe import universe_from
from streams.breadth import BreadthPartials
from streams.connection import AnyRedis, connect
from streams.errors import StreamsError
from streams.events import EventLog
from streams.keys import Keys

log = logging.getLogger("tickwave.breadth")

MARKET = "market"  # the reserved strategy name of the breadth stream (the edge's `market` subscription)
TABLE = "breadth-by-code"
TICKS = "ticks"

TICKS_APPLIED = Counter("tickwave_breadth_ticks_total", "Ticks read by the breadth agent")
REJECTED = Counter("tickwave_breadth_rejected_total",
                   "Ticks the breadth agent left out as bad input (the join dead-letters them)", ["reason"])
COMPUTATIONS = Counter(
    "tickwave_breadth_computations_total",
    "Breadth computations by the worker owning ticks partition 0, by result (appended; unchanged: no tick "
    "since the last; duplicate: the interval was already written; failed: Redis unavailable)", ["result"])
PARTIALS_REFUSED = Counter("tickwave_breadth_partials_refused_total",
                           "Partials not written because a newer one of the partition was stored (a stale owner)")
PARTIAL_AGE = Gauge("tickwave_breadth_partial_age_seconds",
                    "Age of the oldest partition partial in the last breadth computation (a worker not "
                    "contributing its partitions' figures shows here)")
LAG = Gauge("tickwave_breadth_consumer_lag", "Ticks not yet applied to the breadth table, per partition",
            ["partition"])
STOCKS = Gauge("tickwave_breadth_stocks", "Stocks in this worker's breadth table partitions")
DURATION = Histogram("tickwave_breadth_compute_seconds", "Time to write partials and combine one breadth",
                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))

Batches = Callable[[faust.StreamT[bytes], int], AsyncIterator[list[faust.EventT[bytes]]]]


class BreadthWriter:
    """The timer's Redis side: partials and the `market` stream."""

    def __init__(self, client: AnyRedis, keys: Keys, events: EventLog):
        self.client, self.events = client, events
        self.partials = BreadthPartials(client, keys)
        self.last: tuple[tuple[int, int], ...] | None = None

    async def compute(self, states: Any, owned: set[int], interval_s: float) -> str | None:
        """Write the owned partitions' partials; combine and append when owning partition 0.
        Returns the id appended, if any."""
        now = datetime.now(SHANGHAI)
        at_ms = int(now.timestamp() * 1000)
        refused = await self.partials.put(partials(states, owned, at_ms))
        if refused:
            PARTIALS_REFUSED.inc(refused)
        if 0 not in owned:
            return None
        parts = await self.partials.read()
        sig = signature(parts)
        if not parts or sig == self.last:
            COMPUTATIONS.labels("unchanged").inc()
            return None
        breadth = combine(parts, now)
        assert breadth is not None
        PARTIAL_AGE.set(max(0.0, (at_ms - min(int(p.get("at_ms", at_ms)) for p in parts.values())) / 1000))
        ids = await self.events.append_events(MARKET, [breadth], sources=[("breadth", int(time.time() // interval_s))])
        self.last = sig
        COMPUTATIONS.labels("appended" if ids else "duplicate").inc()
        return ids[0] if ids else None


def add_breadth(app: faust.App, ticks: faust.TopicT, settings: WorkerSettings, partitions: int,
                batches: Batches) -> Any:
    """Add the breadth agent, table and timers to the worker's app; returns the table."""
    keys = Keys(settings.key_prefix)
    # bytes keys (the app's raw key serializer), JSON values (its default value serializer)
    table = app.Table(TABLE, default=None, partitions=partitions, key_type=bytes)  # type: ignore[arg-type]
    universe = universe_from(settings.universe_file)
    state: dict[str, BreadthWriter] = {}
    processed: dict[int, int] = {}

    def writer() -> BreadthWriter:
        if "w" not in state:  # made on first use, inside the worker's event loop
            client = connect(settings.redis_url or "")
            events = EventLog(client, keys, retention_ms=settings.event_retention_ms, maxlen=settings.event_maxlen,
                              archive_group=settings.archive_group, hold_max_bytes=settings.event_hold_max_bytes)
            state["w"] = BreadthWriter(client, keys, events)
        return state["w"]

    @app.service
    class BreadthCloser(mode.Service):
        """Closes the breadth writer's Redis client when the worker stops."""

        async def on_stop(self) -> None:
            current = state.pop("w", None)
            if current is not None:
                await current.client.aclose()

    @app.agent(ticks, name="breadth")
    async def breadth(stream: faust.StreamT[bytes]) -> None:
        # a batch is acked after its changelog writes were queued; the driver commits only
        # once the producer flushed them, so a committed tick's state is in the changelog
        # (memory store: no persisted changelog offsets to record, faust's send callback skipped)
        changelog = table.changelog_topic
        async for batch in batches(stream, settings.worker_batch):
            data = table.data
            changed: dict[bytes, tuple[int, list[Any]]] = {}
            for event in batch:
                msg = event.message
                try:
                    tick = parse_tick(event.value)
                except BadTick as exc:
                    REJECTED.labels(exc.reason.split(":")[0]).inc()
                    continue
                key = tick.ts_code.encode()
                new = stock_state(tick, msg.partition, msg.offset, universe.get(tick.ts_code))
                if newer(data.get(key), new):
                    data[key] = new
                    changed[key] = (msg.partition, new)
                if msg.offset > processed.get(msg.partition, -1):
                    processed[msg.partition] = msg.offset
            # what `table[key] = new` does, but with the partition given (faust takes it from the
            # current event, which a batch spanning partitions does not have), once per stock per
            # batch, and sent here rather than through faust's producer buffer: that buffer hands
            # the driver one message per event-loop turn, and measured (bench.breadth) it held the
            # worker to ~1,000 ticks/s at 5,000 stocks
            for key, (partition, new) in changed.items():
                await changelog.send(key=key, value=new, partition=partition,
                                     key_serializer=table.key_serializer,  # type: ignore[attr-defined]
                                     value_serializer=table.value_serializer)  # type: ignore[attr-defined]
            TICKS_APPLIED.inc(len(batch))

    @app.timer(interval=settings.breadth_interval_s)
    async def compute_breadth(app: faust.App) -> None:
        owned = {tp.partition for tp in app.consumer.assignment() if tp.topic == TICKS}
        if not owned:
            return
        started = time.perf_counter()
        try:
            eid = await writer().compute(table.data.values(), owned, settings.breadth_interval_s)
        except StreamsError as exc:
            # an exception in a faust timer crashes the worker: an outage only skips a computation
            COMPUTATIONS.labels("failed").inc()
            log.info("breadth not computed: redis unavailable", extra={"error": str(exc)})
            return
        DURATION.observe(time.perf_counter() - started)
        if eid is not None:
            log.debug("breadth appended", extra={"event_id": eid})

    @app.timer(interval=5.0)
    async def report_breadth_lag(app: faust.App) -> None:
        tps = [tp for tp in app.consumer.assignment() if tp.topic == TICKS]
        owned = {tp.partition for tp in tps}
        STOCKS.set(sum(1 for s in table.data.values() if s[P] in owned))
        if not tps:
            return
        try:
            for tp, high in (await app.consumer.highwaters(*tps)).items():
                done = processed.get(tp.partition)
                position = await app.consumer.position(tp) if done is None else done + 1
                LAG.labels(str(tp.partition)).set(max(0, high - (position or 0)))
        except StreamsError as exc:
            log.info("breadth lag not reported: redis unavailable", extra={"error": str(exc)})
    return table
