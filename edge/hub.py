"""Fan-out hub: one tail per followed stream per node, shared by all its subscribers.

A strategy tail follows `tw:ev:{S}` through the node's consumer group `edge:<node>`
(a restarted node resumes where it stopped, and its lag shows in metrics); a stock
tail follows one partition of the ticks topic with plain reads. A tail starts with
its first subscriber and stops with its last, so streams nobody watches are not read.
Every tail of a kind is read by one `Reader` (edge/reader.py): Redis connections per
node do not grow with strategies or watched stocks. Only strategies that have had an
event can be tailed (the caller checks), and at most `max_tails` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import cast

from edge import metrics
from edge.conn import Outgoing, account_shared
from edge.frames import batch_of, price_update
from edge.klines import KlineSub, KlineTails
from edge.reader import Entries, Entry, Reader
from edge.subscription import Subscription, outgoing
from schemas.events import Tick
from schemas.messages import price_row, quote_doc
from streams import groups
from streams.codec import decode_record, lazy, parse_id
from streams.connection import AnyRedis
from streams.errors import CorruptEntry, translated
from streams.events import EventLog
from streams.keys import Keys
from streams.partition import partition_for
from streams.topics import declare

log = logging.getLogger("tickwave.edge")

TICKS = "ticks"
LAG_EVERY_S = 5.0
STOCK_LABEL = "*"  # stock subscriptions are counted together: codes are not a bounded label set


class NodeFull(Exception):
    """The node already follows `max_tails` streams; a new one cannot start here."""


def subscription_label(sub: Subscription) -> str:
    return STOCK_LABEL if sub.kind == "stock" else sub.target


class StrategyTail:
    def __init__(self, strategy: str, key: str):
        self.strategy, self.key = strategy, key
        self.subs: set[Subscription] = set()
        metrics.FAILOVER_RESYNCS.labels(strategy)  # at 0 from the start: increase() sees the first one
        self.epoch: str | None = None

    def dispatch(self, entries: list[Entry]) -> None:
        for eid, fields in entries:
            lost_after = fields.get(b"fo")
            if lost_after:
                self._failed_over(eid, lost_after.decode())
        batch, bad = batch_of(self.strategy, self.epoch, (lazy(eid, f) for eid, f in entries))
        if bad:
            metrics.REFUSALS.labels("corrupt_event").inc(bad)
            log.warning("unreadable events skipped", extra={"strategy": self.strategy, "count": bad})
        metrics.EVENTS_READ.labels(self.strategy).inc(len(entries))
        if batch is None:
            return
        shared = outgoing(batch)
        for item in shared:
            item.shared = True
        for sub in list(self.subs):
            sub.deliver(batch, shared)
        account_shared(shared)


    def _failed_over(self, eid: bytes | str, after: str) -> None:
        """The first event after a failover: subscribers sent ids past `after` hold lost ids (some
        of their events may come again under new ids), so they resubscribe and get a snapshot."""
        kept = parse_id(after)
        held = [sub for sub in self.subs if sub.seen is not None and sub.seen > kept]
        metrics.FAILOVER_RESYNCS.labels(self.strategy).inc(len(held))
        log.warning("strategy stream failed over: subscribers holding lost ids closed to resync",
                    extra={"strategy": self.strategy, "last_kept_id": after,
                           "next_id": eid.decode() if isinstance(eid, bytes) else eid, "subscribers": len(held)})
        for sub in held:
            sub.sender.close_resync()


class StockTail:
    """Live quotes of the stocks someone subscribed to, from their ticks partition (no group)."""

    def __init__(self, partition: int, key: str):
        self.partition, self.key = partition, key
        self.subs: dict[str, set[Subscription]] = {}

    def dispatch(self, eid: str, fields: dict[bytes, bytes]) -> None:
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
    def __init__(
        self, client: AnyRedis, keys: Keys, events: EventLog, *, node: str, reader: Callable[[], AnyRedis],
        tick_partitions: int, max_tails: int = 1000, cluster_poll_ms: int = 50, batch_window_ms: float = 0,
    ):
        """`client` is the shared pool; `reader` opens a dedicated connection (one per Reader).
        `tick_partitions` is only the default for a ticks topic no one has declared yet."""
        self.client, self.keys, self.events = client, keys, events
        self.group = f"edge:{node}"
        self.consumer = node
        self.default_partitions = tick_partitions
        self.max_tails = max_tails
        self.tails: dict[str, StrategyTail] = {}
        self.stock_tails: dict[int, StockTail] = {}
        self.lag: dict[str, int] = {}
        self._tail_by_key: dict[str, StrategyTail] = {}
        self._stock_by_key: dict[str, StockTail] = {}
        self._partitions: int | None = None
        self._lag_at = 0.0
        self._lock = asyncio.Lock()
        self.event_reader = Reader("events", reader, client, handle=self._on_events,
                                   group=(self.group, self.consumer), recover=self._recover,
                                   poll_ms=cluster_poll_ms, window_ms=batch_window_ms)
        self.tick_reader = Reader("ticks", reader, client, handle=self._on_ticks, poll_ms=cluster_poll_ms)
        self.klines = KlineTails(client, self.tick_reader)  # bar streams: plain reads, like ticks

    def _full(self, more: int = 1) -> bool:
        """Whether `more` new tails would take the node past `max_tails` (kline tails count too)."""
        return len(self.tails) + len(self.stock_tails) + len(self.klines) + more > self.max_tails

    async def join_kline(self, sub: KlineSub) -> None:
        """Attach a `kline` subscription (edge/klines.py); NodeFull when its new tails would
        take the node past `max_tails`."""
        async with self._lock:
            needs = self.klines.needs(sub)
            if needs and self._full(needs):
                raise NodeFull(sub.code)
            await self.klines.join(sub)

    async def tick_partitions(self) -> int:
        """The ticks topic's partition count as stored in Redis (as ingest and the join read it),
        asked once per node."""
        if self._partitions is None:
            self._partitions = (await declare(self.client, self.keys, [TICKS],
                                              partitions=self.default_partitions))[TICKS].partitions
        return self._partitions

    async def join(self, sub: Subscription) -> None:
        """Attach a (buffering) subscription; its tail follows the stream once this returns.
        NodeFull when it would need a new tail and the node has `max_tails`."""
        async with self._lock:
            reader = await (self._join_stock(sub) if sub.kind == "stock" else self._join_strategy(sub))
            metrics.SUBSCRIPTIONS.labels(sub.kind, subscription_label(sub)).inc()
        if reader is not None:
            await reader.interrupt()

    async def _join_strategy(self, sub: Subscription) -> Reader | None:
        tail = self.tails.get(sub.target)
        started = tail is None
        if tail is None:
            if self._full():
                raise NodeFull(sub.target)
            tail = StrategyTail(sub.target, self.events.stream_key(sub.target))
            # a new group starts at the end; an existing one (a restarted node) where it stopped
            await groups.ensure_group(self.client, tail.key, self.group, start_id="$")
            tail.epoch = await self.events.epoch(sub.target)
            self.tails[sub.target] = self._tail_by_key[tail.key] = tail
            self.event_reader.follow(tail.key, ">")
            log.info("tail started", extra={"strategy": sub.target, "group": self.group})
        tail.subs.add(sub)
        return self.event_reader if started else None

    async def _join_stock(self, sub: Subscription) -> Reader | None:
        p = partition_for(sub.code, await self.tick_partitions())
        tail = self.stock_tails.get(p)
        started = tail is None
        if tail is None:
            if self._full():
                raise NodeFull(sub.target)
            tail = StockTail(p, self.keys.topic_partition(TICKS, p))
            with translated(f"tail of {tail.key}"):
                newest = cast(list[Entry], await self.client.xrevrange(tail.key, count=1))
            self.stock_tails[p] = self._stock_by_key[tail.key] = tail
            # from the newest entry now, as an id: quotes from here on, none skipped between reads
            self.tick_reader.follow(tail.key, newest[0][0].decode() if newest else "0-0")
        tail.subs.setdefault(sub.code, set()).add(sub)
        sub.buffering = False
        return self.tick_reader if started else None

    async def leave(self, sub: Subscription) -> None:
        reader = None
        async with self._lock:
            metrics.SUBSCRIPTIONS.labels(sub.kind, subscription_label(sub)).dec()
            if sub.kind == "stock":
                for p, stock_tail in list(self.stock_tails.items()):
                    code_subs = stock_tail.subs.get(sub.code)
                    if code_subs and sub in code_subs:
                        code_subs.discard(sub)
                        if not code_subs:
                            del stock_tail.subs[sub.code]
                        if not stock_tail.subs:
                            del self.stock_tails[p], self._stock_by_key[stock_tail.key]
                            self.tick_reader.unfollow(stock_tail.key)
                            reader = self.tick_reader
            else:
                tail = self.tails.get(sub.target)
                if tail is not None:
                    tail.subs.discard(sub)
                    if not tail.subs:
                        del self.tails[sub.target], self._tail_by_key[tail.key]
                        self.event_reader.unfollow(tail.key)
                        reader = self.event_reader
                        self.lag.pop(sub.target, None)
                        with contextlib.suppress(KeyError):  # no lag measured yet
                            metrics.CONSUMER_LAG.remove(sub.target, self.group)
                        log.info("tail stopped", extra={"strategy": sub.target})
        if reader is not None:
            # not reading a stream nobody watches: its events stay for the group to read later
            await reader.interrupt()

    async def _on_events(self, got: Entries) -> None:
        acks: list[tuple[str, bytes]] = []
        for key, entries in got:
            if not entries:
                continue
            tail = self._tail_by_key.get(key)
            if tail is not None:
                if tail.epoch is None:  # followed before the stream's first event set its epoch
                    tail.epoch = await self.events.epoch(tail.strategy)
                tail.dispatch(entries)
            acks += [(key, eid) for eid, _ in entries]
        if acks:
            await groups.ack(self.client, self.group, acks)
        if time.monotonic() - self._lag_at > LAG_EVERY_S and self.tails:
            self._lag_at = time.monotonic()
            tails = list(self.tails.values())
            lags = await groups.group_lags(self.client, [t.key for t in tails], self.group)
            for tail in tails:
                lag = lags.get(tail.key)
                if lag is not None and tail.strategy in self.tails:
                    metrics.CONSUMER_LAG.labels(tail.strategy, self.group).set(lag)
                    self.lag[tail.strategy] = lag

    async def _recover(self, keys: set[str]) -> None:
        """Groups gone with their streams (deleted and recreated): a new epoch, read from its start."""
        for key in keys:
            tail = self._tail_by_key.get(key)
            if tail is not None and await groups.ensure_group(self.client, key, self.group, start_id="0"):
                log.warning("stream recreated; following the new epoch", extra={"strategy": tail.strategy})
                tail.epoch = await self.events.epoch(tail.strategy)

    async def _on_ticks(self, got: Entries) -> None:
        for key, entries in got:
            if key in self.klines:
                self.klines.dispatch(key, entries)
                continue
            stock_tail = self._stock_by_key.get(key)
            if stock_tail is not None:
                for eid, fields in entries:
                    stock_tail.dispatch(eid.decode(), fields)

    async def close(self) -> None:
        """Stop both readers (promptly: their blocked reads are interrupted) and forget every tail."""
        await asyncio.gather(self.event_reader.stop(), self.tick_reader.stop())
        self.tails.clear()
        self.stock_tails.clear()
        self.klines.subs.clear()
        self._tail_by_key.clear()
        self._stock_by_key.clear()
