"""The join worker: a faust app joining the ticks topic with the strategies' signals.

Two agents on co-partitioned topics (both keyed by ts_code, the same partition count):
- `signal_changes` reads the `signals` topic (written by the outbox relay), keeps the
  `signals-by-code` table (ts_code -> strategy -> signal; recovered from its changelog
  after a restart, moved with its partitions between workers) and appends each change
  to the strategy's stream, exactly once by its outbox id;
- `join` reads the `ticks` topic in batches (by default whatever has arrived, with no
  wait for more) and appends one PriceChange per strategy holding the stock through
  `EventLog.append_events`, exactly once by the tick's (partition, offset);
- `breadth` (agents/market.py) reads the ticks topic too and keeps the market breadth
  table, from which the worker owning ticks partition 0 writes the `market` stream.

Ticks are consumed at-least-once (the driver commits after processing); the append
script's position check turns that into exactly-once output. Bad records go to the
`join` dead-letter stream with a counter and never stop the agents.

    tickwave worker          (several share the partitions through the driver's group)
"""

from __future__ import annotations

import asyncio
import gc
import logging
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import faust
import mode
from prometheus_client import Counter, Gauge, Histogram

from agents import analytics
from agents.join import (
    BadSignalChange,
    BadTick,
    apply_change,
    parse_change,
    parse_tick,
    price_changes,
    signal_source,
    signals_of,
)
from agents.market import add_breadth
from agents.settings import WorkerSettings
from schemas.events import PriceChange
from schemas.market import SHANGHAI
from streams.codec import GENERATION_HEADER, parse_generation
from streams.connection import AnyRedis, connect
from streams.deadletter import dead_letter
from streams.errors import StreamsError, StreamUnavailable
from streams.events import EventLog
from streams.keys import Keys
from streams.topics import declare

log = logging.getLogger("tickwave.worker")

TICKS, SIGNALS, TABLE = "ticks", "signals", "signals-by-code"
DEAD_LETTERS = "join"

TICKS_JOINED = Counter("tickwave_join_ticks_total", "Ticks read by the join")
EVENTS = Counter("tickwave_join_events_total", "Price-change events appended by the join", ["strategy"])
SIGNAL_CHANGES = Counter("tickwave_join_signal_changes_total", "Signal changes applied", ["strategy", "action"])
REJECTED = Counter("tickwave_join_rejected_total", "Records dead-lettered by the join", ["topic", "reason"])
APPEND_RETRIES = Counter("tickwave_join_append_retries_total", "Appends retried after Redis was unavailable")
LATENCY = Histogram(
    "tickwave_join_latency_seconds", "Tick time to price-change event appended",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LAG = Gauge("tickwave_join_consumer_lag", "Ticks not yet joined, per partition", ["topic", "partition"])
SIGNALS_HELD = Gauge("tickwave_join_signals_held", "Signals in this worker's table partitions")

RAW = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}


def broker_url(redis_url: str, key_prefix: str, options: str = "") -> str:
    """The faust broker URL for a Redis URL: the same server, the deployment's key prefix,
    and the driver's own parameters (which a plain Redis client would refuse)."""
    parts = urlsplit(redis_url)
    query = dict(parse_qsl(parts.query))
    query.update(parse_qsl(options))
    query.setdefault("prefix", key_prefix)
    return urlunsplit(parts._replace(query=urlencode(query)))


async def stored_partitions(client: AnyRedis, keys: Keys, default: int) -> int:
    """The ticks topic's partition count as stored (first declaration wins), and the signals
    topic declared with the same count so the two are co-partitioned."""
    ticks = (await declare(client, keys, [TICKS], partitions=default))[TICKS].partitions
    signals = (await declare(client, keys, [SIGNALS], partitions=ticks))[SIGNALS].partitions
    if signals != ticks:
        raise StreamsError(f"the signals topic has {signals} partitions and ticks {ticks}: "
                           "the join needs them co-partitioned (recreate the signals topic)")
    return ticks


class Joiner:
    """What the agents do with a batch, apart from faust: parse, join, append, count."""

    def __init__(self, client: AnyRedis, keys: Keys, events: EventLog):
        self.client, self.keys, self.events = client, keys, events
        self.processed: dict[int, int] = {}  # ticks partition -> last offset joined
        self.stopping = False

    async def _append(self, strategy: str, batch: Sequence[Any], sources: Sequence[Any] | None = None,
                      generations: Sequence[tuple[int, int]] | None = None) -> list[str]:
        """Append, holding the batch through a Redis outage (the offsets are not acked meanwhile)."""
        backoff = 0.1
        while True:
            try:
                return await self.events.append_events(strategy, batch, sources=sources, generations=generations)
            except StreamUnavailable as exc:
                APPEND_RETRIES.inc()
                if backoff == 0.1:
                    log.warning("redis unavailable; holding the batch", extra={"strategy": strategy, "error": str(exc)})
                if self.stopping:
                    raise
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _reject(self, topic: str, reason: str, partition: int, offset: int,
                      key: bytes | None, value: bytes | None) -> None:
        REJECTED.labels(topic, reason.split(":")[0]).inc()
        log.info("record dead-lettered", extra={"topic": topic, "partition": partition, "offset": offset,
                                                "reason": reason})
        backoff = 0.1
        while True:  # held like an append: the record is not acked until its dead letter is written
            try:
                await dead_letter(self.client, self.keys, DEAD_LETTERS, reason=reason,
                                  origin=f"{topic}/{partition}/{offset}", raw={b"k": key or b"", b"v": value or b""})
                return
            except StreamUnavailable:
                if self.stopping:
                    raise
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def join_ticks(self, records: Sequence[tuple[int, int, bytes | None, bytes | None, tuple[int, int]]],
                         lookup: Any) -> int:
        """Join (partition, offset, key, value, partition generation) tick records with
        `lookup(ts_code)` (the table); returns how many events were appended."""
        now = datetime.now(SHANGHAI)
        by_strategy: dict[str, list[PriceChange]] = defaultdict(list)
        gens: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for partition, offset, key, value, gen in records:
            try:
                tick = parse_tick(value)
            except BadTick as exc:
                await self._reject(TICKS, exc.reason, partition, offset, key, value)
                continue
            held = lookup(tick.ts_code)
            if held:
                for change in price_changes(tick, signals_of(held), ingest_time=now,
                                            partition=partition, offset=offset):
                    by_strategy[change.strategy].append(change)
                    gens[change.strategy].append(gen)
        TICKS_JOINED.inc(len(records))
        written = await asyncio.gather(*(self._append(s, batch, generations=gens[s])
                                         for s, batch in by_strategy.items()))
        appended_at = time.time()
        total = 0
        for (strategy, batch), ids in zip(by_strategy.items(), written):
            EVENTS.labels(strategy).inc(len(ids))
            total += len(ids)
            if ids:
                for change in batch:
                    LATENCY.observe(max(0.0, appended_at - change.tick_time.timestamp()))
        for partition, offset, _key, _value, _gen in records:
            if offset > self.processed.get(partition, -1):
                self.processed[partition] = offset
        return total


# faust's consumer hands fetched records to a stream one every few event-loop turns (its
# _drain_messages awaits each delivery in two tasks): a channel still empty after this many
# turns has received everything the driver fetched. Measured on a 60,000-tick burst: 2 turns
# split batches at ~100 ticks (where the drain loop also yields), 3 and 4 filled them to 500.
DRAIN_TURNS = 4


async def arrived(stream: faust.StreamT[bytes], most: int) -> AsyncIterator[list[faust.EventT[bytes]]]:
    """The stream's events in batches of what has arrived (at most `most`), each batch acked
    when the loop asks for the next one, i.e. after it was processed. A batch ends when the
    stream's channel stays empty for DRAIN_TURNS loop turns, not after a fixed window: a tick
    waits for no timer, and under load batches fill up to `most`."""
    manual = stream.noack()  # type: ignore[attr-defined]  # missing from StreamT, public on Stream
    batch: list[faust.EventT[bytes]] = []
    async for event in manual.events():
        batch.append(event)
        if len(batch) < most:
            for _ in range(DRAIN_TURNS):
                if not manual.channel.empty():
                    break
                await asyncio.sleep(0)
            if not manual.channel.empty():
                continue
        yield batch
        for done in batch:
            await manual.ack(done)
        batch = []


def _generation(event: faust.EventT[bytes]) -> tuple[int, int]:
    """The tick partition's generation the driver read the tick in (a header; (0, 0) before any failover)."""
    headers = event.message.headers
    if isinstance(headers, dict):
        return parse_generation(headers.get(GENERATION_HEADER))
    for pair in headers or []:
        if pair[0] == GENERATION_HEADER:
            return parse_generation(pair[1])
    return 0, 0


def build_app(settings: WorkerSettings, partitions: int) -> faust.App:
    """The join app on `partitions` co-partitioned partitions of ticks and signals."""
    assert settings.redis_url
    keys = Keys(settings.key_prefix)
    app = faust.App(
        settings.worker_app_id,
        broker=broker_url(settings.redis_url, settings.key_prefix, settings.worker_broker_options),
        web_enabled=False,
        topic_partitions=partitions,
        datadir=settings.worker_datadir or tempfile.mkdtemp(prefix="tickwave-worker-"),
        broker_commit_interval=settings.worker_commit_interval,
        consumer_auto_offset_reset="earliest",
        table_standby_replicas=settings.worker_standby_replicas,
        producer_linger=0.0,
    )
    ticks = app.topic(TICKS, partitions=partitions, **RAW)  # type: ignore[arg-type]
    signals = app.topic(SIGNALS, partitions=partitions, **RAW)  # type: ignore[arg-type]
    # json keys and values (faust's defaults): value_type=dict would be taken for a Record type
    table = app.Table(TABLE, default=dict, partitions=partitions)
    state: dict[str, Joiner] = {}

    def joiner() -> Joiner:
        # made on first use, inside the worker's event loop
        if "joiner" not in state:
            client = connect(settings.redis_url or "")
            events = EventLog(client, keys, retention_ms=settings.event_retention_ms, maxlen=settings.event_maxlen,
                              archive_group=settings.archive_group, hold_max_bytes=settings.event_hold_max_bytes,
                              replica_wait_ms=settings.worker_replica_wait_ms)
            state["joiner"] = Joiner(client, keys, events)
        return state["joiner"]

    @app.service
    class Closer(mode.Service):
        """Stops the joiner's retries and closes its Redis client when the worker stops."""

        async def on_stop(self) -> None:
            current = state.pop("joiner", None)
            if current is not None:
                current.stopping = True
                await current.client.aclose()

    def lookup(ts_code: str) -> Any:
        return table.get(ts_code)

    @app.agent(signals, name="signal_changes")
    async def signal_changes(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            j = joiner()
            msg = event.message
            try:
                change = parse_change(event.value)
            except BadSignalChange as exc:
                await j._reject(SIGNALS, str(exc), msg.partition, msg.offset, event.key, event.value)
                continue
            code = change.signal.ts_code
            table[code] = apply_change(table.get(code), change)
            source = signal_source(msg.partition, msg.offset, msg.headers)
            await j._append(change.signal.strategy, [change], [source])
            SIGNAL_CHANGES.labels(change.signal.strategy, change.action).inc()
            log.info("signal change applied", extra={"strategy": change.signal.strategy, "ts_code": code,
                                                     "action": change.action, "position": f"{source[0]}/{source[1]}"})

    # the K-line bars (agents/analytics.py) are made from the join's own batches, in its loop: a
    # second agent on the ticks costs faust's per-message delivery and iteration twice
    # (bench.analytics: ~100 µs of worker CPU per tick); a batch is acked once both are done
    bars = analytics.install(app, ticks, settings, partitions, lambda: joiner().client) \
        if settings.kline_enabled else None

    @app.agent(ticks, name="join")
    async def join(stream: faust.StreamT[bytes]) -> None:
        # both ack a batch's offsets only once the loop asks for the next batch, i.e. after
        # its events were appended (faust/streams.py for take_events)
        if settings.worker_batch_window_s > 0:
            batches = stream.take_events(settings.worker_batch, within=settings.worker_batch_window_s)  # type: ignore[attr-defined]
        else:
            batches = arrived(stream, settings.worker_batch)
        async for batch in batches:
            records = [(e.message.partition, e.message.offset, e.key, e.value, _generation(e)) for e in batch]
            await joiner().join_ticks(records, lookup)
            if bars is not None:
                await bars([r[:4] for r in records])  # the bars take no partition generation

    if settings.worker_breadth:
        add_breadth(app, ticks, settings, partitions, arrived)

    @app.task
    async def freeze_startup_objects() -> None:
        # a full collection walks every tracked object: ~100,000 here after start-up (faust,
        # mode, pydantic, the app), 30-170 ms with the join's ticks waiting behind it (measured
        # in bench.pipeline (b)); frozen, they are left out and one takes a few ms
        gc.collect()
        gc.freeze()
        log.info("start-up objects frozen", extra={"objects": gc.get_freeze_count()})

    @app.timer(interval=5.0)
    async def report_lag(app: faust.App) -> None:
        tps = [tp for tp in app.consumer.assignment() if tp.topic == TICKS]
        if not tps:
            return
        processed = joiner().processed
        try:
            marks = await app.consumer.highwaters(*tps)
            for tp, high in marks.items():
                done = processed.get(tp.partition)
                position = await app.consumer.position(tp) if done is None else done + 1
                LAG.labels(TICKS, str(tp.partition)).set(max(0, high - (position or 0)))
        except StreamsError as exc:
            # an exception in a faust timer crashes the worker: a Redis outage must only skip a report
            log.info("lag not reported: redis unavailable", extra={"error": str(exc)})
        SIGNALS_HELD.set(sum(len(v) for v in table.values()))

    return app
