"""The faust producer on Redis Streams: sends are queued and written in pipelined batches.

`send` only queues the record and returns a future; one flusher writes
everything queued since its last round trip in a single pipeline (one append
script call per partition). Before each round trip it lingers (2 ms by
default, faust's `producer_linger` when larger) so that a busy agent's sends
share it. One batch is in flight at a time, which keeps every
partition in send order. While Redis is down the batch is held and retried
with backoff; nothing is dropped and the futures stay pending.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict, deque
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from faust.exceptions import ProducerSendError
from faust.transport import producer as base
from faust.types import TP, HeadersArg, RecordMetadata
from mode import Seconds, Service

from streams.codec import EncodedRecord, encode_record
from streams.driver.logs import ERROR, INFO, WARNING, Streak, note
from streams.errors import StreamsError, StreamUnavailable
from streams.log import RecordAppender
from streams.partition import partition_for

if TYPE_CHECKING:
    from streams.driver.transport import Transport


MAX_BATCH = 5000
NOT_SUPPORTED = ("transactions (processing_guarantee='exactly_once') are not supported by the "
                 "Redis Streams driver; its guarantee is at-least-once")


class _Queued(NamedTuple):
    topic: str
    partition: int
    record: EncodedRecord
    timestamp: float
    future: asyncio.Future[RecordMetadata]


class Producer(base.Producer):
    """Batched, pipelined appends to topic-partition streams."""

    transport: Transport

    def __post_init__(self) -> None:
        self._queue: deque[_Queued] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._round_robin: defaultdict[str, itertools.count[int]] = defaultdict(itertools.count)
        self._written: set[str] = set()
        self._appender: RecordAppender | None = None  # made on first use: the client comes with start
        # faust's documented hook for stamping headers on every produced message
        self._on_produce_message = self.app.on_produce_message.send

    async def on_start(self) -> None:
        await super().on_start()
        # a bad URL or an unreachable server is reported at start-up, not at the first send
        await self.transport.acquire()

    async def on_stop(self) -> None:
        timeout = self.transport.options.stop_flush_timeout
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except asyncio.TimeoutError:
            left = len(self._queue)
            note(ERROR, "producer stopped with records not written", records=left, timeout_s=timeout)
            for queued in self._queue:
                if not queued.future.done():
                    queued.future.set_exception(ProducerSendError("producer stopped before Redis took the record"))
            self._queue.clear()

    async def on_shutdown(self) -> None:
        await self.transport.release()

    # --- sending ------------------------------------------------------------
    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: HeadersArg | None,
        *,
        transactional_id: str | None = None,
    ) -> Awaitable[RecordMetadata]:
        """Queue one record; the future resolves with its partition and offset once written."""
        topics = self.transport.topics
        settings = topics.cached(topic)
        if settings is None:
            await self.transport.check_topics([topic])
            settings = (await topics.ensure([topic]))[topic]
        if partition is None:
            partition = (partition_for(key, settings.partitions) if key
                         else next(self._round_robin[topic]) % settings.partitions)
        elif not 0 <= partition < settings.partitions:
            raise ProducerSendError(f"topic {topic!r} has no partition {partition} "
                                    f"(it has {settings.partitions})")
        ts = timestamp if timestamp else time.time()
        if isinstance(headers, Mapping):
            headers = list(headers.items())
        self._on_produce_message(key=key, value=value, partition=partition, timestamp=timestamp, headers=headers)
        fut: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()
        self._queue.append(_Queued(topic, partition, encode_record(key, value, headers, int(ts * 1000)), ts, fut))
        self._written.add(topic)
        self._idle.clear()
        self._wake.set()
        return fut

    async def send_and_wait(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: HeadersArg | None,
        *,
        transactional_id: str | None = None,
    ) -> RecordMetadata:
        """Send and wait until Redis has the record; returns its partition and offset."""
        fut = await self.send(topic, key, value, partition, timestamp, headers)
        return await fut

    async def flush(self) -> None:
        """Wait until every queued record is written."""
        await self.buffer.flush()
        while self._queue or not self._idle.is_set():
            await self._idle.wait()

    @Service.task
    async def _flusher(self) -> None:
        streak = Streak("producer write: records held")
        linger = max(self.linger_ms / 1000, self.transport.options.linger)
        while True:
            if not self._queue:
                self._idle.set()
                if self.should_stop:
                    break
                self._wake.clear()
                await self._wake.wait()
                continue
            if linger and len(self._queue) < MAX_BATCH and not self.should_stop:
                # let the agents queue more before the round trip: a pipeline per
                # handful of records costs more than the records themselves
                await asyncio.sleep(linger)
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_BATCH))]
            try:
                await self._write(batch)
            except StreamUnavailable as exc:
                # hold the batch, in order, and retry: the futures stay pending, nothing is lost
                self._queue.extendleft(reversed(batch))
                await asyncio.sleep(streak.failed(exc, records=len(self._queue)))
                continue
            except StreamsError as exc:
                note(ERROR, "records refused by redis", error=str(exc), records=len(batch))
                for q in batch:
                    if not q.future.done():
                        q.future.set_exception(ProducerSendError(f"Redis refused the record: {exc}"))
                continue
            streak.ok()

    async def _write(self, batch: list[_Queued]) -> None:
        groups: dict[tuple[str, int], list[_Queued]] = {}
        for q in batch:
            groups.setdefault((q.topic, q.partition), []).append(q)
        firsts = await self._append(groups)
        for (topic, partition), items in groups.items():
            first = firsts[(topic, partition)]
            tp = TP(topic, partition)
            for i, q in enumerate(items):
                if not q.future.done():
                    q.future.set_result(RecordMetadata(topic, partition, tp, first + i, q.timestamp, 0))

    async def _append(self, groups: dict[tuple[str, int], list[_Queued]]) -> dict[tuple[str, int], int]:
        topics = self.transport.topics
        if self._appender is None:
            self._appender = RecordAppender(self.transport.redis, topics.keys)
        maxlen = {}
        compacting = set()
        for topic, _partition in groups:
            settings = topics.cached(topic)
            maxlen[topic] = settings.maxlen if settings else 0
            if settings and settings.compacting:
                compacting.add(topic)
        return await self._appender.append_many(
            {tp: [q.record for q in items] for tp, items in groups.items()}, maxlen, compacting=compacting)

    @Service.task
    async def _trimmer(self) -> None:
        interval = self.transport.options.trim_interval
        while not self.should_stop:
            await self.sleep(interval)
            if self.should_stop:
                break
            try:
                removed = await self.transport.topics.trim_expired(sorted(self._written))
            except StreamsError as exc:
                note(WARNING, "retention trim failed", error=str(exc))
            else:
                if removed:
                    note(INFO, "retention trimmed", entries=removed)

    # --- topics and partitions ----------------------------------------------
    async def create_topic(
        self,
        topic: str,
        partitions: int,
        replication: int,
        *,
        config: Mapping[str, Any] | None = None,
        timeout: Seconds = 30.0,
        retention: Seconds | None = None,
        compacting: bool | None = None,
        deleting: bool | None = None,
        ensure_created: bool = False,
    ) -> None:
        """Declare a topic: its partition count, retention turned into MINID/MAXLEN trimming,
        compaction (faust declares table changelogs compacting)."""
        await self.transport.create_topic(topic, partitions, config=config, retention=retention,
                                          compacting=compacting)

    def key_partition(self, topic: str, key: bytes) -> TP:
        """The partition a key goes to, by the shared murmur2 partitioner."""
        settings = self.transport.topics.cached(topic)
        n = settings.partitions if settings else self.transport.topics.default_partitions
        return TP(topic, partition_for(key, n))

    def supports_headers(self) -> bool:
        return True

    # --- transactions: not offered -------------------------------------------
    async def begin_transaction(self, transactional_id: str) -> None:
        raise NotImplementedError(NOT_SUPPORTED)

    async def commit_transaction(self, transactional_id: str) -> None:
        raise NotImplementedError(NOT_SUPPORTED)

    async def abort_transaction(self, transactional_id: str) -> None:
        raise NotImplementedError(NOT_SUPPORTED)

    async def stop_transaction(self, transactional_id: str) -> None:
        raise NotImplementedError(NOT_SUPPORTED)

    async def maybe_begin_transaction(self, transactional_id: str) -> None:
        raise NotImplementedError(NOT_SUPPORTED)

    async def commit_transactions(
        self,
        tid_to_offset_map: Mapping[str, Mapping[TP, int]],
        group_id: str,
        start_new_transaction: bool = True,
    ) -> None:
        raise NotImplementedError(NOT_SUPPORTED)
