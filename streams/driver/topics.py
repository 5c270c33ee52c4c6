"""The driver's view of topics: settings cached per process (see streams.topics, where every
writer declares them), watermarks of many partitions at once, and retention trimming.
Every producer reads the partition count from Redis, so a keyed message lands on the same
partition whoever sends it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, cast

from faust.types import TP

from streams.codec import id_to_offset, offset_to_id
from streams.connection import AnyRedis, execute
from streams.driver.logs import WARNING, note
from streams.errors import StreamsError, translated
from streams.keys import Keys
from streams.topics import TopicSettings, declare, stored
from streams.log import queue_bounds, read_bounds



class Topics:
    """Create topics, read their settings (cached: they never change once set), watermarks, trim."""

    def __init__(self, client: AnyRedis, keys: Keys, *, default_partitions: int):
        if default_partitions < 1:
            raise StreamsError("default partitions must be at least 1")
        self.client = client
        self.keys = keys
        self.default_partitions = default_partitions
        self._settings: dict[str, TopicSettings] = {}

    def cached(self, topic: str) -> TopicSettings | None:
        """Settings already read, without a round trip (faust asks for partitions synchronously)."""
        return self._settings.get(topic)

    async def ensure(
        self, topics: Iterable[str], *, partitions: int | None = None,
        retention_ms: int = 0, maxlen: int = 0, compacting: bool | None = None,
    ) -> dict[str, TopicSettings]:
        """Settings of each topic, creating the missing ones (first writer wins, like Kafka's
        auto-create): one pipelined round trip for all of them."""
        topics = list(topics)
        names = [t for t in dict.fromkeys(topics) if t not in self._settings]
        self._settings.update(await declare(
            self.client, self.keys, names, partitions=partitions or self.default_partitions,
            retention_ms=retention_ms, maxlen=maxlen, compacting=compacting))
        return {t: self._settings[t] for t in topics}

    async def create(
        self, topic: str, partitions: int, *, retention_ms: int = 0, maxlen: int = 0, compacting: bool | None = None,
    ) -> TopicSettings:
        """Declare a topic; an existing one keeps its settings (logged when they differ)."""
        self._settings.pop(topic, None)
        settings = (await self.ensure([topic], partitions=partitions, retention_ms=retention_ms, maxlen=maxlen,
                                      compacting=compacting))[topic]
        if settings.partitions != partitions:
            note(WARNING, "topic exists with other settings", topic=topic, partitions=settings.partitions, asked=partitions)
        return settings

    async def ends(self, topic: str) -> dict[int, int]:
        """The next offset of each partition of a topic, without declaring it: {} when it does not exist."""
        settings = self.cached(topic) or await stored(self.client, self.keys, topic)
        if settings is None:
            return {}
        marks = await self.watermarks(TP(topic, p) for p in range(settings.partitions))
        return {tp.partition: high for tp, (_low, high) in marks.items()}

    def stream(self, tp: TP) -> str:
        return self.keys.topic_partition(tp.topic, tp.partition)

    async def watermarks(self, tps: Iterable[TP]) -> dict[TP, tuple[int, int]]:
        """(earliest offset kept, next offset to be written) per partition, one round trip."""
        tps = list(tps)
        if not tps:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for tp in tps:
            queue_bounds(pipe, self.keys, tp.topic, tp.partition)
        replies = await execute(pipe, "watermarks")
        return {tp: read_bounds(*replies[3 * i:3 * i + 3]) for i, tp in enumerate(tps)}

    async def trim_expired(self, topics: Iterable[str], *, now_ms: int | None = None, page: int = 500) -> int:
        """Drop entries older than each topic's retention (MINID on the first young entry);
        returns how many were removed. Timestamps are the producers': the scan stops at the
        first young entry, so an old one behind it waits, as in a Kafka segment."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        removed = 0
        for topic in topics:
            settings = self.cached(topic)
            if settings is None or not settings.retention_ms:
                continue
            cutoff = now_ms - settings.retention_ms
            for partition in range(settings.partitions):
                removed += await self._trim_partition(TP(topic, partition), cutoff, page)
        return removed

    async def _trim_partition(self, tp: TP, cutoff_ms: int, page: int) -> int:
        key = self.stream(tp)
        low: Any = "-"
        keep_from: int | None = None
        with translated(f"trim {key}"):
            while keep_from is None:
                entries = cast(list[tuple[bytes, dict[bytes, bytes]]],
                               await self.client.xrange(key, min=low, count=page))
                if not entries:
                    break
                for eid, fields in entries:
                    if int(fields.get(b"t", b"0")) >= cutoff_ms:
                        keep_from = id_to_offset(eid)
                        break
                else:
                    if len(entries) < page:  # every entry is old
                        keep_from = id_to_offset(entries[-1][0]) + 1
                        break
                    low = f"({entries[-1][0].decode()}"
            if keep_from is None:
                return 0
            return int(await self.client.xtrim(key, minid=offset_to_id(keep_from), approximate=False))
