"""The PostgreSQL event archive: idempotent COPY writes and ordered reads by event id, and
the gaps (events removed from Redis before they were archived) history must not paper over."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import asyncpg
import orjson

from streams.codec import StoredEvent, event_fields, event_parts, parse_id
from streams.errors import CorruptEntry, pg_translated
from streams.events import Gap

_COLUMNS = ("strategy", "epoch", "ms", "seq", "ts_code", "kind", "schema_version", "event")
_LOW, _HIGH = (-1, -1), (2**62, 2**62)


class ArchiveRow(NamedTuple):
    """One event as the archive stores it; built straight from stream fields, no re-encoding."""

    strategy: str
    epoch: str
    ms: int
    seq: int
    ts_code: str
    kind: str
    schema_version: int
    event: str  # JSON text


def row_from_entry(strategy: str, epoch: str, event_id: str, fields: dict[bytes, bytes]) -> ArchiveRow:
    """An archive row straight from a stream entry, or CorruptEntry.

    The archive keeps the event bytes as the stream holds them. Writers validated
    the event (append_events takes models); here the checks are structural, the
    ones a COPY into jsonb needs, and a full decode happens when history reads it.
    """
    kind, version, body = event_parts(event_id, fields)
    try:
        doc = orjson.loads(body)
        # a breadth entry (the `market` stream) is about no one stock: archived with ts_code ''
        ts_code = doc["ts_code"] if kind == b"price" else doc["signal"]["ts_code"] if kind == b"signal" else ""
    except (KeyError, TypeError, ValueError) as exc:  # orjson.JSONDecodeError is a ValueError
        raise CorruptEntry(f"undecodable event: {exc!r}", event_id) from None
    if not isinstance(ts_code, str):
        raise CorruptEntry("ts_code is not a string", event_id)
    ms, seq = parse_id(event_id)
    return ArchiveRow(strategy, epoch, ms, seq, ts_code, kind.decode(), version, body.decode())


def row_from_event(strategy: str, epoch: str, stored: StoredEvent) -> ArchiveRow:
    return row_from_entry(strategy, epoch, stored.id, stored.fields)


def _stored(record: asyncpg.Record) -> StoredEvent:
    return StoredEvent(f"{record['ms']}-{record['seq']}", fields=event_fields(
        record["kind"].encode(), record["schema_version"], record["event"].encode()))


class ArchiveStore:
    """Reads and writes `event_archive` through the process's pool (history's `Archive`)."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def write_rows(self, rows: Iterable[ArchiveRow], conn: asyncpg.Connection | None = None) -> int:
        """COPY into a staging table, then insert what is not there yet; returns rows inserted."""
        rows = list(rows)
        if not rows:
            return 0
        if conn is None:
            with pg_translated("archive write"):
                async with self.pool.acquire() as acquired:
                    return await self.write_rows(rows, acquired)
        with pg_translated("archive write"):
            async with conn.transaction():
                await conn.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS archive_stage "
                    "(LIKE event_archive INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                )
                await conn.copy_records_to_table("archive_stage", records=rows, columns=_COLUMNS)
                status = await conn.execute(
                    f"INSERT INTO event_archive ({', '.join(_COLUMNS)}) "
                    f"SELECT {', '.join(_COLUMNS)} FROM archive_stage ON CONFLICT DO NOTHING"
                )
        return int(status.rsplit(" ", 1)[-1])

    async def write(self, strategy: str, epoch: str, events: Sequence[StoredEvent]) -> int:
        """Archive decoded events (tests, tools); the archiver uses write_rows."""
        return await self.write_rows(row_from_event(strategy, epoch, e) for e in events)

    async def read_after(
        self,
        strategy: str,
        epoch: str,
        after_id: str | None,
        *,
        until_id: str | None = None,
        before_id: str | None = None,
        limit: int,
    ) -> list[StoredEvent]:
        """Archived events with after_id < id <= until_id (and < before_id), oldest first."""
        low = parse_id(after_id) if after_id else (-1, -1)
        high = parse_id(until_id) if until_id else (2**62, 2**62)
        if before_id is not None:
            ms, seq = parse_id(before_id)
            high = min(high, (ms, seq - 1) if seq else (ms - 1, 2**62))
        with pg_translated("archive read"):
            records = await self.pool.fetch(
                "SELECT ms, seq, kind, schema_version, event::text AS event FROM event_archive "
                "WHERE strategy = $1 AND epoch = $2 AND (ms, seq) > ($3, $4) AND (ms, seq) <= ($5, $6) "
                "ORDER BY ms, seq LIMIT $7",
                strategy, epoch, low[0], low[1], high[0], high[1], limit,
            )
        return [_stored(r) for r in records]

    async def last_id(self, strategy: str, epoch: str) -> str | None:
        """Newest archived id of a strategy's epoch."""
        with pg_translated("archive read"):
            row = await self.pool.fetchrow(
                "SELECT ms, seq FROM event_archive WHERE strategy = $1 AND epoch = $2 "
                "ORDER BY ms DESC, seq DESC LIMIT 1",
                strategy, epoch,
            )
        return f"{row['ms']}-{row['seq']}" if row else None

    async def count(self, strategy: str, epoch: str | None = None) -> int:
        with pg_translated("archive read"):
            if epoch is None:
                return int(await self.pool.fetchval("SELECT count(*) FROM event_archive WHERE strategy = $1", strategy))
            return int(await self.pool.fetchval(
                "SELECT count(*) FROM event_archive WHERE strategy = $1 AND epoch = $2", strategy, epoch))

    async def record_gap(self, gap: Gap) -> tuple[bool, int]:
        """Store a gap, or extend the one starting at the same id; returns (new, events newly counted).

        A gap's count is what Redis removed unacknowledged, less what reached the archive anyway
        (an archiver's batch in flight when the trim ran): one archiver applies gaps between its
        batches, so by then its in-flight batch is committed.
        """
        first, last = parse_id(gap.first_id), parse_id(gap.last_id)
        with pg_translated("archive gap"):
            async with self.pool.acquire() as conn, conn.transaction():
                # archivers sharing the group may apply the same record at once: one at a time
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext('tickwave.archive_gaps.' || $1 "
                                   "|| current_schema()))", gap.strategy)
                lost = gap.lost
                if lost is not None:
                    archived = await conn.fetchval(
                        "SELECT count(*) FROM event_archive WHERE strategy = $1 AND epoch = $2 "
                        "AND (ms, seq) >= ($3, $4) AND (ms, seq) <= ($5, $6)",
                        gap.strategy, gap.epoch, *first, *last)
                    lost = max(0, lost - int(archived))
                old = await conn.fetchrow(
                    "SELECT last_ms, last_seq, lost FROM archive_gaps "
                    "WHERE strategy = $1 AND epoch = $2 AND first_ms = $3 AND first_seq = $4",
                    gap.strategy, gap.epoch, *first)
                if old is None:
                    await conn.execute(
                        "INSERT INTO archive_gaps (strategy, epoch, first_ms, first_seq, last_ms, last_seq, lost, "
                        "reason) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                        gap.strategy, gap.epoch, *first, *last, lost, gap.reason)
                    return True, lost or 0
                old_last, old_lost = (old["last_ms"], old["last_seq"]), old["lost"]
                if last <= old_last and (lost is None or (old_lost is not None and lost <= old_lost)):
                    return False, 0  # applied before (a record moved twice)
                new_lost = None if lost is None or old_lost is None else max(lost, old_lost)
                await conn.execute(
                    "UPDATE archive_gaps SET last_ms = $5, last_seq = $6, lost = $7, detected_at = now() "
                    "WHERE strategy = $1 AND epoch = $2 AND first_ms = $3 AND first_seq = $4",
                    gap.strategy, gap.epoch, *first, *max(last, old_last), new_lost)
                return False, (new_lost - old_lost) if new_lost is not None and old_lost is not None else 0

    async def has_gap(self, strategy: str, epoch: str, after_id: str | None, until_id: str | None) -> bool:
        """Whether a recorded gap of the epoch touches (after_id, until_id]."""
        low = parse_id(after_id) if after_id else _LOW
        high = parse_id(until_id) if until_id else _HIGH
        with pg_translated("archive read"):
            return bool(await self.pool.fetchval(
                "SELECT EXISTS (SELECT 1 FROM archive_gaps WHERE strategy = $1 AND epoch = $2 "
                "AND (last_ms, last_seq) > ($3, $4) AND (first_ms, first_seq) <= ($5, $6))",
                strategy, epoch, *low, *high))

    async def gaps(self, strategy: str) -> list[Gap]:
        """Every recorded gap of a strategy, oldest first (tools and tests)."""
        with pg_translated("archive read"):
            rows = await self.pool.fetch(
                "SELECT * FROM archive_gaps WHERE strategy = $1 ORDER BY epoch, first_ms, first_seq", strategy)
        return [Gap(strategy, r["epoch"], f"{r['first_ms']}-{r['first_seq']}", f"{r['last_ms']}-{r['last_seq']}",
                    r["lost"], r["reason"]) for r in rows]
