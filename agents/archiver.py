"""The archiver: a consumer group on every strategy stream, copying events into PostgreSQL.

Acknowledged only after the COPY commits, so a crash re-delivers instead of
losing; the archive's ON CONFLICT makes the re-delivery harmless. Event writers
never trim what the group has not acknowledged (streams/append_events.lua) up to
a memory ceiling; what they trim past it they record, and the archiver moves those
records into `archive_gaps`. It also looks for gaps nobody recorded (entries
removed by something else) and records them too, each logged and counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from prometheus_client import Counter, Gauge

from streams import groups
from streams.archive import ArchiveRow, ArchiveStore, row_from_entry
from streams.codec import id_after, id_before, parse_id
from streams.connection import AnyRedis, execute
from streams.deadletter import dead_letter
from streams.errors import (
    ArchiveUnavailable,
    CommandError,
    CorruptEntry,
    NoGroup,
    StreamUnavailable,
    translated,
)
from streams.events import DEFAULT_ARCHIVE_GROUP, EventLog, Gap
from streams.keys import Keys
from streams.klines import BarArchive, BarLog, decoded, partitions_with_bars
from streams.topics import stored

log = logging.getLogger("tickwave.archiver")

ARCHIVED = Counter("tickwave_archive_events_total", "Events archived into PostgreSQL", ["strategy"])
REJECTED = Counter("tickwave_archive_rejected_total", "Corrupt entries dead-lettered by the archiver", ["strategy"])
LAG_ENTRIES = Gauge("tickwave_archive_lag_entries", "Events in Redis not yet archived", ["strategy"])
LAG_EVERY_S = 5.0
LAG_SECONDS = Gauge("tickwave_archive_lag_seconds", "Age of the newest event not yet archived", ["strategy"])
GAPS = Counter("tickwave_archive_gaps_total", "Gaps recorded in the archive: events removed from Redis unarchived",
               ["strategy", "reason"])
LOST = Counter("tickwave_archive_lost_events_total",
               "Events known to be missing from the archive (gaps of unknown size add nothing)", ["strategy"])

Entry = tuple[bytes, dict[bytes, bytes]]
BARS_ARCHIVED = Counter("tickwave_archive_bars_total", "1-minute K-line bars archived into PostgreSQL")
BARS_EVERY_S = 1.0


class BarArchiver:
    """Copies new 1-minute bars into `kline_archive`, then records per stock the newest archived
    id in the partition's `klarch` hash, which the bar append never trims past. No consumer
    group: one XRANGE per stock from its recorded id, pipelined per partition."""

    def __init__(self, client: AnyRedis, keys: Keys, store: BarArchive, *, batch: int = 1000):
        self.client, self.keys, self.store, self.batch = client, keys, store, batch

    async def round(self) -> int:
        """Archive what is new in every bar stream; returns bars archived."""
        settings = await stored(self.client, self.keys, "ticks")
        if settings is None:
            return 0
        log_ = BarLog(self.client, self.keys)
        total = 0
        for partition, codes in (await partitions_with_bars(self.client, self.keys, settings.partitions)).items():
            epoch = await log_.epoch(partition)
            if epoch is None:
                continue
            with translated("read archived bar ids"):
                raw = cast(dict[bytes, bytes], await self.client.hgetall(self.keys.kline_archived(partition)))
            marks = {k.decode(): v.decode() for k, v in raw.items()}
            pipe = self.client.pipeline(transaction=False)
            for code in codes:
                after = marks.get(code)
                pipe.xrange(self.keys.kline(partition, code), min=f"({after}" if after else "-", count=self.batch)
            replies = await execute(pipe, "read bars to archive")
            bars = [b for raw in replies for b in decoded(raw or [])]
            if not bars:
                continue
            await self.store.write(epoch, bars)  # commit first ...
            newest: dict[str | bytes, str | bytes] = {}
            for b in bars:
                newest[b.ts_code] = b.event_id or ""
            with translated("record archived bar ids"):
                await self.client.hset(self.keys.kline_archived(partition), mapping=newest)  # type: ignore[arg-type]  # ... then record
            BARS_ARCHIVED.inc(len(bars))
            total += len(bars)
        return total


@dataclass
class ArchiverStats:
    archived: int = 0
    rejected: int = 0
    gaps: int = 0  # gaps this process recorded (new ones, not extensions)
    lost: int = 0  # events those gaps count as lost
    per_strategy: dict[str, int] = field(default_factory=dict)


class Archiver:
    """One archiver process (several may run: they share the group's entries)."""

    def __init__(
        self,
        client: AnyRedis,
        keys: Keys,
        store: ArchiveStore,
        *,
        group: str = DEFAULT_ARCHIVE_GROUP,
        consumer: str = "archiver-1",
        batch: int = 2000,
        claim_idle_ms: int = 30_000,
        refresh_s: float = 5.0,
        on_progress: Callable[[ArchiverStats], None] | None = None,
    ):
        self.client, self.keys, self.store = client, keys, store
        self.events = EventLog(client, keys)
        self.group, self.consumer, self.batch = group, consumer, batch
        self.claim_idle_ms, self.refresh_s = claim_idle_ms, refresh_s
        self.on_progress = on_progress
        self.stats = ArchiverStats()
        self._streams: dict[str, str] = {}  # stream key -> strategy
        self._epochs: dict[str, str] = {}
        self._last_refresh = 0.0
        self._last_lag = 0.0
        self.bars = BarArchiver(client, keys, BarArchive(store.pool))
        self._last_bars = 0.0

    async def _refresh(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_refresh < self.refresh_s:
            return
        self._last_refresh = time.monotonic()
        for strategy in await self.events.strategies():
            key = self.events.stream_key(strategy)
            epoch = await self.events.epoch(strategy)
            if epoch:
                self._epochs[strategy] = epoch
            if key not in self._streams:
                try:
                    # never the stream itself: a stream made here, empty, under the old epoch key
                    # would keep that epoch when writers refill it (append_events makes the stream,
                    # a new epoch and this group together)
                    await groups.ensure_group(self.client, key, self.group, start_id="0", mkstream=False)
                except NoGroup:
                    raise
                except CommandError:
                    continue  # deleted; picked up when a writer makes it again
                # before the first read: once entries past a hole are archived it no longer shows
                await self._find_trimmed(strategy)
                await self._find_deleted(key, strategy)
                self._streams[key] = strategy
                log.info("archiving strategy", extra={"strategy": strategy, "group": self.group})

    async def _record(self, gap: Gap) -> None:
        """Write a gap into the archive; log and count it when it is new or grew."""
        new, lost = await self.store.record_gap(gap)
        if not new and not lost:
            return
        if new:
            GAPS.labels(gap.strategy, gap.reason).inc()
            self.stats.gaps += 1
        LOST.labels(gap.strategy).inc(lost)
        self.stats.lost += lost
        log.error("events missing from the archive" if new else "gap in the archive grew", extra={
            "strategy": gap.strategy, "epoch": gap.epoch, "first": gap.first_id, "last": gap.last_id,
            "lost": "unknown" if gap.lost is None else lost, "reason": gap.reason})

    async def _move_gap_records(self) -> None:
        """Move the writers' gap records into the archive (then delete them from Redis)."""
        for strategy in list(self._streams.values()):
            records = await self.events.gap_records(strategy)
            for gap in records:
                await self._record(gap)
            await self.events.drop_gap_records(strategy, [g.record_id for g in records if g.record_id])

    async def _known_gap(self, strategy: str, epoch: str, first: str, last: str) -> bool:
        after = id_before(first)
        return (await self.events.has_gap(strategy, epoch, after, last)
                or await self.store.has_gap(strategy, epoch, after, last))

    async def _find_trimmed(self, strategy: str) -> None:
        """Record events trimmed before they were archived that no writer recorded.

        Writers trim only what the group acknowledged and keep one archived entry, so the
        archive always reaches Redis's oldest entry; when it does not although Redis trimmed,
        something else removed unarchived entries (a group made after trimming, a trim by hand,
        a writer without a group). How many is unknown."""
        epoch = self._epochs.get(strategy)
        first_kept = await self.events.first_id(strategy)  # before the archive's end: see below
        origin = await self.events.origin_id(strategy)
        if not epoch or first_kept is None or origin is None or first_kept == origin:
            return
        # read after first_kept: entries archived since only move the end further
        last = await self.store.last_id(strategy, epoch)
        if last is not None and parse_id(last) >= parse_id(first_kept):
            return
        first, until = id_after(last) if last else origin, id_before(first_kept)
        if not await self._known_gap(strategy, epoch, first, until):
            await self._record(Gap(strategy, epoch, first, until, None, "trimmed"))

    async def _find_deleted(self, key: str, strategy: str) -> None:
        """Redis 7 names the newest entry deleted by XDEL: one newer than the archive's end was
        never archived (trims do not move it: _find_trimmed covers those)."""
        epoch = self._epochs.get(strategy)
        with translated(f"stream info of {key}"):
            info = await self.client.xinfo_stream(key)
        deleted = info.get("max-deleted-entry-id")
        deleted = deleted.decode() if isinstance(deleted, bytes) else deleted
        if not epoch or not deleted or deleted == "0-0":
            return
        last = await self.store.last_id(strategy, epoch)
        if last is not None and parse_id(last) >= parse_id(deleted):
            return
        first = id_after(last) if last else "0-1"
        if not await self._known_gap(strategy, epoch, first, deleted):
            await self._record(Gap(strategy, epoch, first, deleted, None, "deleted"))

    async def _rows(self, key: str, entries: list[Entry]) -> tuple[list[ArchiveRow], list[bytes]]:
        strategy = self._streams[key]
        # read per batch: a stream deleted and recreated starts a new epoch with its group
        epoch = await self.events.epoch(strategy) or self._epochs.get(strategy) or "unknown"
        self._epochs[strategy] = epoch
        rows: list[ArchiveRow] = []
        ids: list[bytes] = []
        gone: list[str] = []
        for eid, fields in entries:
            ids.append(eid)
            if not fields:  # delivered, then trimmed before it was archived
                gone.append(eid.decode())
                continue
            try:
                rows.append(row_from_entry(strategy, epoch, eid.decode(), fields))
            except CorruptEntry as exc:
                reason = getattr(exc, "reason", None) or str(exc)
                await dead_letter(self.client, self.keys, "archiver", reason=reason,
                                  origin=f"{key}/{eid.decode()}", raw=fields)
                REJECTED.labels(strategy).inc()
                self.stats.rejected += 1
                log.warning("corrupt event dead-lettered", extra={"strategy": strategy, "id": eid.decode(), "reason": reason})
        if gone and not await self._known_gap(strategy, epoch, gone[0], gone[-1]):
            await self._record(Gap(strategy, epoch, gone[0], gone[-1], len(gone), "trimmed"))
        return rows, ids

    async def _archive(self, batches: list[tuple[str, list[Entry]]]) -> int:
        rows: list[ArchiveRow] = []
        acks: list[tuple[str, bytes]] = []
        for key, entries in batches:
            if key not in self._streams:
                continue
            got, ids = await self._rows(key, entries)
            rows += got
            acks += [(key, i) for i in ids]
        if not acks:
            return 0
        await self.store.write_rows(rows)  # commit first ...
        await groups.ack(self.client, self.group, acks)  # ... then acknowledge
        for row in rows:
            self.stats.per_strategy[row.strategy] = self.stats.per_strategy.get(row.strategy, 0) + 1
        for strategy in {r.strategy for r in rows}:
            ARCHIVED.labels(strategy).inc(sum(1 for r in rows if r.strategy == strategy))
        self.stats.archived += len(rows)
        if self.on_progress:
            self.on_progress(self.stats)
        return len(acks)

    async def _recover_pending(self) -> None:
        """Re-archive what this consumer read but never acknowledged, then claim dead consumers' entries."""
        for key in list(self._streams):
            while True:
                got = await groups.read_group(self.client, self.group, self.consumer, {key: "0"}, count=self.batch)
                if not got or not got[0][1] or not await self._archive(got):
                    break
            while True:
                claimed = await groups.claim_idle(self.client, key, self.group, self.consumer,
                                                  min_idle_ms=self.claim_idle_ms, count=self.batch)
                if not claimed:
                    break
                log.info("claimed idle entries", extra={"stream": key, "count": len(claimed)})
                await self._archive([(key, claimed)])

    async def _update_lag(self) -> None:
        """Lag in entries (undelivered + pending) and seconds (age of the oldest unarchived event);
        gap records moved, and gaps nobody recorded looked for, at the same pace."""
        now_ms = time.time() * 1000
        await self._move_gap_records()
        for key, strategy in list(self._streams.items()):
            try:
                with translated(f"archive lag of {key}"):
                    await self._update_lag_of(key, strategy, now_ms)
                await self._find_trimmed(strategy)
                await self._find_deleted(key, strategy)
            except NoGroup:
                raise
            except CommandError as exc:  # the stream is gone for now; the next read finds out
                log.info("stream not readable", extra={"stream": key, "error": str(exc)})

    async def _update_lag_of(self, key: str, strategy: str, now_ms: float) -> None:
        """One stream's lag gauges."""
        info = next((g for g in await self.client.xinfo_groups(key)
                     if g.get("name") in (self.group, self.group.encode())), None)
        if info is None:
            return
        pending = int(info.get("pending") or 0)
        last = info.get("last-delivered-id") or b"0-0"
        last = last.decode() if isinstance(last, bytes) else str(last)
        if pending:
            oldest = (await self.client.xpending(key, self.group))["min"]
        else:
            after = await self.client.xrange(key, min=f"({last}", count=1)
            oldest = after[0][0] if after else None
        lag = info.get("lag")
        if lag is None:  # Redis 6.2 does not report it
            lag = len(await self.client.xrange(key, min=f"({last}", count=10_000) or [])
        LAG_ENTRIES.labels(strategy).set(int(lag) + pending)
        if oldest is None:
            LAG_SECONDS.labels(strategy).set(0)
        else:
            ms, _ = parse_id(oldest.decode() if isinstance(oldest, bytes) else str(oldest))
            LAG_SECONDS.labels(strategy).set(max(0.0, (now_ms - ms) / 1000))

    async def run(self, stop: asyncio.Event) -> ArchiverStats:
        """Archive until `stop` is set; a batch in flight is finished (written and acked) first."""
        backoff = 0.5
        recovered = False
        last_claim = time.monotonic()
        while not stop.is_set():
            try:
                await self._refresh(force=not recovered)
                if not recovered:
                    await self._move_gap_records()
                    await self._recover_pending()
                    recovered = True
                if time.monotonic() - self._last_bars > BARS_EVERY_S:
                    self._last_bars = time.monotonic()
                    await self.bars.round()
                if time.monotonic() - last_claim > self.claim_idle_ms / 1000:
                    await self._recover_pending()
                    last_claim = time.monotonic()
                if not self._streams:
                    await asyncio.wait_for(stop.wait(), timeout=self.refresh_s)
                    continue
                got = await groups.read_group(self.client, self.group, self.consumer,
                                              {k: ">" for k in self._streams}, count=self.batch, block_ms=500)
                if got:
                    await self._archive(got)
                # under load too: a lag gauge that only moves when idle hides the lag that matters
                if not got or time.monotonic() - self._last_lag > LAG_EVERY_S:
                    await self._update_lag()
                    self._last_lag = time.monotonic()
                backoff = 0.5
            except asyncio.TimeoutError:
                continue
            except NoGroup as exc:  # a stream was deleted and recreated: groups go with it
                log.warning("consumer group vanished; recreating", extra={"error": str(exc)})
                self._streams.clear()
                recovered = False
                continue
            except (StreamUnavailable, ArchiveUnavailable, OSError) as exc:
                log.warning("redis or postgres unavailable; retrying", extra={"error": str(exc), "retry_in_s": backoff})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)
        return self.stats
