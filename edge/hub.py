"""Fan-out hub: one consumer-group tail per strategy stream per node, shared by all its subscribers.

A tail starts with the first subscriber and stops with the last, so streams
nobody watches are not read. Its group is `edge:<node>`: a restarted node
resumes where it stopped, and its lag shows in metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import cast

from edge import metrics
from edge.conn import Outgoing
from edge.frames import batch_of, price_update
from edge.subscription import Subscription, outgoing
from schemas.events import Tick
from schemas.messages import price_row, quote_doc
from streams import groups
from streams.codec import decode_record, lazy
from streams.connection import AnyRedis
from streams.errors import CorruptEntry, NoGroup, StreamUnavailable, translated
from streams.events import EventLog
from streams.keys import Keys
from streams.partition import partition_for

log = logging.getLogger("tickwave.edge")

async def _stop_task(tail: StrategyTail | StockTail) -> None:
    # redis-py can turn a cancelled blocking read into a ConnectionError, which the
    # retry loop would swallow: the flag ends the loop whatever the read raised
    tail.stopping = True
    if tail.task:
        tail.task.cancel()
        try:
            await asyncio.wait_for(tail.task, timeout=5)
        except (asyncio.CancelledError, asyncio.TimeoutError):
            pass


class StrategyTail:
    def __init__(self, hub: Hub, strategy: str):
        self.hub, self.strategy = hub, strategy
        self.key = hub.events.stream_key(strategy)
        self.subs: set[Subscription] = set()
        self.epoch: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.stopping = False

    async def start(self) -> None:
        await groups.ensure_group(self.hub.client, self.key, self.hub.group, start_id="$")
        self.epoch = await self.hub.events.epoch(self.strategy)
        self.task = asyncio.create_task(self._run(), name=f"tail-{self.strategy}")
        log.info("tail started", extra={"strategy": self.strategy, "group": self.hub.group})

    async def stop(self) -> None:
        await _stop_task(self)
        log.info("tail stopped", extra={"strategy": self.strategy})

    async def _run(self) -> None:
        backoff = 0.2
        last_lag = 0.0
        while not self.stopping:
            try:
                got = await groups.read_group(self.hub.client, self.hub.group, self.hub.consumer,
                                              {self.key: ">"}, count=1000, block_ms=1000)
                for _, entries in got:
                    if entries:
                        self._dispatch(entries)
                        await groups.ack(self.hub.client, self.hub.group, [(self.key, e[0]) for e in entries])
                if time.monotonic() - last_lag > 5:
                    last_lag = time.monotonic()
                    lag = await groups.group_lag(self.hub.client, self.key, self.hub.group)
                    if lag is not None:
                        metrics.CONSUMER_LAG.labels(self.strategy, self.hub.group).set(lag)
                        self.hub.lag[self.strategy] = lag
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except NoGroup:
                # the stream was deleted and recreated: a new epoch, a new group
                log.warning("stream recreated; following the new epoch", extra={"strategy": self.strategy})
                await groups.ensure_group(self.hub.client, self.key, self.hub.group, start_id="0")
                self.epoch = await self.hub.events.epoch(self.strategy)
            except StreamUnavailable as exc:
                if self.stopping:
                    return
                log.warning("redis unavailable; retrying", extra={"strategy": self.strategy, "error": str(exc)})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5)

    def _dispatch(self, entries: list[tuple[bytes, dict[bytes, bytes]]]) -> None:
        batch, bad = batch_of(self.strategy, self.epoch, (lazy(eid, f) for eid, f in entries))
        if bad:
            metrics.REFUSALS.labels("corrupt_event").inc(bad)
            log.warning("unreadable events skipped", extra={"strategy": self.strategy, "count": bad})
        metrics.EVENTS_READ.labels(self.strategy).inc(len(entries))
        if batch is None:
            return
        shared = outgoing(batch)
        for sub in list(self.subs):
            sub.deliver(batch, shared)


class StockTail:
    """Live quotes of the stocks someone subscribed to, from their ticks partition (no group)."""

    def __init__(self, hub: Hub, partition: int):
        self.hub, self.partition = hub, partition
        self.key = hub.keys.topic_partition("ticks", partition)
        self.subs: dict[str, set[Subscription]] = {}
        self.task: asyncio.Task[None] | None = None
        self.stopping = False

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"stock-tail-{self.partition}")

    async def stop(self) -> None:
        await _stop_task(self)

    async def _run(self) -> None:
        last = "$"
        while not self.stopping:
            try:
                with translated(f"tail {self.key}"):
                    reply = await self.hub.client.xread({self.key: last}, count=1000, block=1000)
            except StreamUnavailable:
                await asyncio.sleep(1)
                continue
            for _, entries in cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], reply or []):
                for eid, fields in entries:
                    last = eid.decode() if isinstance(eid, bytes) else eid
                    self._dispatch(last, fields)

    def _dispatch(self, eid: str, fields: dict[bytes, bytes]) -> None:
        try:
            record = decode_record(eid, fields)
        except CorruptEntry:
            metrics.REFUSALS.labels("corrupt_tick").inc()
            return
        code = (record.key or b"").decode()
        subs = self.subs.get(code)
        if not subs or record.value is None:
            return
        try:
            tick = Tick.model_validate_json(record.value)
        except ValueError:
            metrics.REFUSALS.labels("corrupt_tick").inc()
            return
        row = price_row(eid, quote_doc(tick))
        for sub in subs:
            sub.sender.put(Outgoing(price_update(sub.target, None, [row]), "price_update",
                                    record.timestamp_ms, (sub.target, None, [row])))


class Hub:
    def __init__(self, client: AnyRedis, keys: Keys, events: EventLog, *, node: str, tick_partitions: int):
        self.client, self.keys, self.events = client, keys, events
        self.group = f"edge:{node}"
        self.consumer = node
        self.tick_partitions = tick_partitions
        self.tails: dict[str, StrategyTail] = {}
        self.stock_tails: dict[int, StockTail] = {}
        self.lag: dict[str, int] = {}
        self._lock = asyncio.Lock()

    async def join(self, sub: Subscription) -> None:
        """Attach a (buffering) subscription; returns once its tail is reading."""
        async with self._lock:
            if sub.kind == "stock":
                p = partition_for(sub.code, self.tick_partitions)
                tail = self.stock_tails.get(p)
                if tail is None:
                    tail = self.stock_tails[p] = StockTail(self, p)
                    tail.start()
                tail.subs.setdefault(sub.code, set()).add(sub)
                sub.buffering = False
            else:
                strategy_tail = self.tails.get(sub.target)
                if strategy_tail is None:
                    strategy_tail = StrategyTail(self, sub.target)
                    await strategy_tail.start()
                    self.tails[sub.target] = strategy_tail
                strategy_tail.subs.add(sub)
            metrics.SUBSCRIPTIONS.labels(sub.kind, sub.target).inc()

    async def leave(self, sub: Subscription) -> None:
        async with self._lock:
            metrics.SUBSCRIPTIONS.labels(sub.kind, sub.target).dec()
            if sub.kind == "stock":
                for p, tail in list(self.stock_tails.items()):
                    code_subs = tail.subs.get(sub.code)
                    if code_subs and sub in code_subs:
                        code_subs.discard(sub)
                        if not code_subs:
                            del tail.subs[sub.code]
                        if not tail.subs:
                            del self.stock_tails[p]
                            await tail.stop()
                return
            strategy_tail = self.tails.get(sub.target)
            if strategy_tail is None:
                return
            strategy_tail.subs.discard(sub)
            if not strategy_tail.subs:
                del self.tails[sub.target]
                await strategy_tail.stop()

    async def close(self) -> None:
        for tail in list(self.tails.values()):
            await tail.stop()
        for stock_tail in list(self.stock_tails.values()):
            await stock_tail.stop()
        self.tails.clear()
        self.stock_tails.clear()
