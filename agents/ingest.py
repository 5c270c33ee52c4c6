"""The tick writer: validate, drop unchanged quotes, partition, append to the ticks topic.

Bad ticks go to `tw:dlq:{ingest}` with their reason and raw payload, and are
counted; nothing a source sends stops ingestion.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter as Tally
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Histogram

from agents.sources import RawTick, Source
from agents.validate import TickRejected, check_tick, parse_tick
from schemas.events import Tick
from schemas.universe import Universe
from streams.codec import EncodedRecord, encode_record
from streams.connection import AnyRedis, execute
from streams.deadletter import dead_letter_fields
from streams.errors import StreamUnavailable
from streams.keys import Keys
from streams.log import PartitionLog
from streams.partition import partition_for
from streams.topics import declare

log = logging.getLogger("tickwave.ingest")

TOPIC = "ticks"
FETCHED = Counter("tickwave_ingest_ticks_fetched_total", "Ticks received from the source", ["source"])
APPENDED = Counter("tickwave_ingest_ticks_appended_total", "Ticks appended to the ticks topic", ["source"])
DUPLICATES = Counter("tickwave_ingest_duplicates_skipped_total", "Unchanged quotes not appended again", ["source"])
REJECTED = Counter("tickwave_ingest_ticks_rejected_total", "Ticks dead-lettered", ["source", "reason"])
SOURCE_ERRORS = Counter("tickwave_ingest_source_errors_total", "Source failures", ["source", "kind"])
FETCH_LATENCY = Histogram("tickwave_ingest_fetch_seconds", "Time to get one batch from the source", ["source"])


async def topic_partitions(client: AnyRedis, keys: Keys, topic: str, default: int) -> int:
    """The topic's partition count as stored in Redis (set to `default` by the first caller)."""
    return (await declare(client, keys, [topic], partitions=default))[topic].partitions


@dataclass
class IngestStats:
    fetched: int = 0
    appended: int = 0
    duplicates: int = 0
    rejected: Tally[str] = field(default_factory=Tally)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


def _raw_payload(raw: RawTick) -> bytes:
    if isinstance(raw, Tick):
        return raw.model_dump_json().encode()
    return json.dumps(dict(raw), default=str, ensure_ascii=False).encode()


class TickWriter:
    """Turns batches from one source into appends; keeps per-code dedup and volume state."""

    def __init__(
        self,
        client: AnyRedis,
        keys: Keys,
        *,
        partitions: int,
        source: str,
        maxlen: int | None = None,
        universe: Universe | None = None,
    ):
        self.client, self.keys, self.source = client, keys, source
        self.partitions = partitions
        # listing dates and ST flags for validation; a code missing from it is checked as seasoned
        self.universe = universe
        self.log = PartitionLog(client, keys, TOPIC, maxlen=maxlen)
        self.stats = IngestStats()
        self._last: dict[str, tuple[Any, float]] = {}  # ts_code -> (time, price) last appended
        self._volume: dict[str, tuple[Any, int]] = {}  # ts_code -> (trade date, volume)

    def _sort(self, batch: Sequence[RawTick]) -> tuple[dict[int, list[EncodedRecord]], list[tuple[str, str, RawTick]]]:
        appends: dict[int, list[EncodedRecord]] = {}
        rejects: list[tuple[str, str, RawTick]] = []
        for raw in batch:
            try:
                tick = parse_tick(raw)
            except TickRejected as exc:
                rejects.append((exc.reason, exc.detail, raw))
                continue
            code = tick.ts_code
            last = self._last.get(code)
            if last is not None and last == (tick.time, tick.price):
                self.stats.duplicates += 1
                DUPLICATES.labels(self.source).inc()
                continue
            day = tick.time.date()
            prev = self._volume.get(code)
            listing = self.universe.get(code) if self.universe is not None else None
            reason = check_tick(tick, prev[1] if prev and prev[0] == day else None, listing)
            if reason:
                rejects.append((reason, "", raw))
                continue
            self._last[code] = (tick.time, tick.price)
            self._volume[code] = (day, tick.volume)
            value = tick.__pydantic_serializer__.to_json(tick)
            appends.setdefault(partition_for(code, self.partitions), []).append(
                encode_record(code.encode(), value, None, int(tick.time.timestamp() * 1000))
            )
        return appends, rejects

    async def write(self, batch: Sequence[RawTick], stop: asyncio.Event | None = None) -> None:
        """Validate and append one batch. While Redis is unreachable the same sorted batch is
        retried with backoff (sorting again would take its ticks for duplicates of themselves),
        until it lands or `stop` is set; a retry after a partial pipeline may append some
        partitions twice (at-least-once)."""
        self.stats.fetched += len(batch)
        FETCHED.labels(self.source).inc(len(batch))
        appends, rejects = self._sort(batch)
        backoff, failing = 0.2, False
        while True:
            try:
                await self._land(appends, rejects)
                if failing:
                    log.info("redis reachable again", extra={"source": self.source})
                return
            except StreamUnavailable as exc:
                SOURCE_ERRORS.labels(self.source, "redis").inc()
                if not failing:
                    log.warning("redis unreachable; holding the batch and retrying",
                                extra={"source": self.source, "error": str(exc), "ticks": len(batch)})
                    failing = True
                if stop is not None and stop.is_set():
                    raise
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _land(
        self,
        appends: dict[int, list[EncodedRecord]],
        rejects: list[tuple[str, str, RawTick]],
    ) -> None:
        if rejects:
            pipe = self.client.pipeline(transaction=False)
            for reason, detail, raw in rejects:
                pipe.xadd(self.keys.dead_letters("ingest"),
                          dead_letter_fields(reason if not detail else f"{reason}: {detail}",
                                             f"source:{self.source}", _raw_payload(raw)),  # type: ignore[arg-type]
                          maxlen=100_000, approximate=True)
            await execute(pipe, "dead-letter ticks")
            for reason, detail, _ in rejects:
                self.stats.rejected[reason] += 1
                REJECTED.labels(self.source, reason).inc()
                log.info("tick rejected", extra={"source": self.source, "reason": reason, "detail": detail})
            rejects.clear()  # landed: a retry of the appends must not dead-letter them again
        if appends:
            await self.log.append_many(appends)
            n = sum(len(v) for v in appends.values())
            self.stats.appended += n
            APPENDED.labels(self.source).inc(n)
            appends.clear()


async def run_ingest(
    client: AnyRedis,
    keys: Keys,
    source: Source,
    *,
    stop: asyncio.Event,
    partitions: int = 8,
    maxlen: int | None = None,
    universe: Universe | None = None,
    on_progress: Callable[[IngestStats], None] | None = None,
) -> IngestStats:
    """Pull batches from `source` and write them until it ends or `stop` is set; `universe`
    gives validation the listing dates of new listings.

    A batch already fetched when `stop` is set is written whole before returning.
    """
    n = await topic_partitions(client, keys, TOPIC, partitions)
    writer = TickWriter(client, keys, partitions=n, source=source.name, maxlen=maxlen, universe=universe)
    batches = source.batches().__aiter__()
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            started = time.perf_counter()
            fetch = asyncio.ensure_future(batches.__anext__())
            done, _ = await asyncio.wait({fetch, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if fetch not in done:
                # nothing fetched is lost: the source was waiting, not holding a batch
                fetch.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await fetch
                break
            try:
                batch = fetch.result()
            except StopAsyncIteration:
                break
            FETCH_LATENCY.labels(source.name).observe(time.perf_counter() - started)
            await writer.write(batch, stop)
            if on_progress:
                on_progress(writer.stats)
    finally:
        stopped.cancel()
        aclose = getattr(batches, "aclose", None)
        if aclose is not None:
            await aclose()
    return writer.stats


def summary(stats: IngestStats) -> Mapping[str, Any]:
    return {"fetched": stats.fetched, "appended": stats.appended, "duplicates": stats.duplicates,
            "rejected": stats.rejected_total}
