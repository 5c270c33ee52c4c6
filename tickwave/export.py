"""`tickwave export`: a strategy's history (Redis, then the archive) into CSV, Parquet or NDJSON.

History is read page by page, as the edge's history API reads it, and every page must be
covered: a range with a hole is refused (`HistoryHole`) rather than written. The file is
written under a temporary name beside the target and renamed only when the whole range is
in it, so a refused or interrupted export leaves no file, and never a partial one.

Prices are float64, not decimals: every price and percentage in tickwave is a float from
the source's quote to the join's arithmetic and the stored JSON, so float64 holds exactly
what the pipeline holds (A-share prices have two decimals, funds three; float64 keeps 15
significant digits, and `round(price, 2)` gives the exchange's figure back). A decimal type
would claim a precision the data never had. Times are zone-aware (Asia/Shanghai) with
microseconds, as stored.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.events import PriceChange
from schemas.market import SHANGHAI
from streams.codec import StoredEvent, parse_id
from streams.events import EventLog
from streams.history import Archive, History, history

Format = Literal["csv", "parquet", "ndjson"]
FORMATS: dict[str, Format] = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".ndjson": "ndjson",
                              ".jsonl": "ndjson"}
# the largest stream sequence number the archive's reads use as "the end of a millisecond"
_END_OF_MS = 2**62

TIME = pa.timestamp("us", tz="Asia/Shanghai")
SCHEMA = pa.schema([
    pa.field("event_id", pa.string(), nullable=False),
    pa.field("epoch", pa.string(), nullable=False),
    pa.field("strategy", pa.string(), nullable=False),
    pa.field("ts_code", pa.string(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("price", pa.float64(), nullable=False),
    pa.field("pre_close", pa.float64(), nullable=False),
    pa.field("change", pa.float64(), nullable=False),
    pa.field("change_percent", pa.float64(), nullable=False),
    pa.field("signal_price", pa.float64()),
    pa.field("change_since_signal_percent", pa.float64()),
    pa.field("volume", pa.int64(), nullable=False),
    pa.field("tick_time", TIME, nullable=False),
    pa.field("ingest_time", TIME, nullable=False),
    pa.field("source_partition", pa.int32(), nullable=False),
    pa.field("source_offset", pa.int64(), nullable=False),
])
COLUMNS = SCHEMA.names


class HistoryHole(Exception):
    """History cannot cover the range; nothing was written."""

    def __init__(self, strategy: str, reason: str | None, after_id: str | None, until_id: str | None):
        self.reason = reason or "unknown"
        span = f"after {after_id or 'the first event'} up to {until_id or 'the newest'}"
        super().__init__(f"history cannot cover {strategy} {span}: {_EXPLAIN.get(self.reason, self.reason)}")


_EXPLAIN = {
    "unknown_strategy": "no such strategy (it has never had an event)",
    "epoch_changed": "the stream was recreated since (another epoch); ask without --epoch for the current one",
    "no_archive": "Redis no longer holds the start of the range and there is no archive (set DATABASE_URL)",
    "gap": "events were trimmed from Redis before the archive kept them (a hole); see TickwaveArchiveLagging",
}


def price_record(stored: StoredEvent, epoch: str) -> dict[str, Any]:
    """One row of the tabular formats from a price event."""
    event = stored.event
    assert isinstance(event, PriceChange)
    return {
        "event_id": stored.id, "epoch": epoch, "strategy": event.strategy, "ts_code": event.ts_code,
        "name": event.name, "price": event.price, "pre_close": event.pre_close, "change": event.change,
        "change_percent": event.change_percent, "signal_price": event.signal_price,
        "change_since_signal_percent": event.change_since_signal_percent, "volume": event.volume,
        "tick_time": event.tick_time, "ingest_time": event.ingest_time,
        "source_partition": event.source_partition, "source_offset": event.source_offset,
    }


class Writer(Protocol):
    def write(self, events: list[StoredEvent], epoch: str) -> int: ...

    def close(self) -> None: ...


class NdjsonWriter:
    """Every event, price and signal, as the history API's NDJSON: the stored JSON plus id, kind, epoch."""

    def __init__(self, out: IO[bytes]):
        self.out = out

    def write(self, events: list[StoredEvent], epoch: str) -> int:
        lines = []
        for stored in events:
            doc = stored.event.model_dump(mode="json")
            doc.update(event_id=stored.id, kind=stored.kind, epoch=epoch)
            lines.append(json.dumps(doc, ensure_ascii=False))
        if lines:
            self.out.write(("\n".join(lines) + "\n").encode())
        return len(lines)

    def close(self) -> None:
        pass


class CsvWriter:
    """Price events, one row each, the columns of SCHEMA; times in ISO 8601 with +08:00."""

    def __init__(self, out: IO[bytes]):
        self.out = out
        self.buf = io.StringIO()
        self.csv = csv.DictWriter(self.buf, fieldnames=COLUMNS)
        self.csv.writeheader()

    def write(self, events: list[StoredEvent], epoch: str) -> int:
        rows = [price_record(s, epoch) for s in events if s.is_price]
        for row in rows:
            row["tick_time"] = row["tick_time"].isoformat()
            row["ingest_time"] = row["ingest_time"].isoformat()
            self.csv.writerow(row)
        self.out.write(self.buf.getvalue().encode())
        self.buf.seek(0)
        self.buf.truncate()
        return len(rows)

    def close(self) -> None:
        self.out.write(self.buf.getvalue().encode())


class ParquetWriter:
    """Price events, one row group per page, typed by SCHEMA."""

    def __init__(self, out: IO[bytes]):
        self.writer = pq.ParquetWriter(out, SCHEMA, compression="zstd")

    def write(self, events: list[StoredEvent], epoch: str) -> int:
        rows = [price_record(s, epoch) for s in events if s.is_price]
        if rows:
            self.writer.write_table(pa.Table.from_pylist(rows, schema=SCHEMA))
        return len(rows)

    def close(self) -> None:
        self.writer.close()


WRITERS: dict[Format, Callable[[IO[bytes]], Writer]] = {
    "csv": CsvWriter, "parquet": ParquetWriter, "ndjson": NdjsonWriter}


def format_of(path: Path, given: str | None) -> Format:
    """The format given, or the one the file name's suffix names; ValueError when neither does."""
    if given:
        return given  # type: ignore[return-value]
    found = FORMATS.get(path.suffix.lower())
    if found is None:
        raise ValueError(f"cannot tell the format from {path.name!r}: give --format csv|parquet|ndjson")
    return found


def boundary(value: str | None) -> str | None:
    """An event id as given, or a time turned into the id bound history takes (after_id <
    id <= until_id), so that a start time keeps the events at or after it and an end time
    the events before it. An event's time here is its id's: when it was appended, within
    milliseconds of its tick while the join keeps up. Naive times are Beijing time."""
    if value is None:
        return None
    try:
        parse_id(value)
        return value
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is neither an event id (1732415403000-0) nor a time (2026-11-24T10:00)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=SHANGHAI)
    ms = int(when.timestamp() * 1000)
    # the last possible id of the millisecond before `when`
    return f"{ms - 1}-{_END_OF_MS}"


@dataclass(frozen=True)
class Exported:
    rows: int  # rows written (price events for csv and parquet, every event for ndjson)
    events: int  # events read from history in the range
    epoch: str | None
    until_id: str | None


async def export(
    log: EventLog, store: Archive | None, strategy: str, out: Path, fmt: Format, *,
    since: str | None = None, until: str | None = None, epoch: str | None = None,
    page_size: int,
    progress: Callable[[int], None] = lambda n: None,
    read: Callable[..., Awaitable[History]] = history,
) -> Exported:
    """Write the events with since < id <= until (until: the newest event now, when not given)
    to `out`, or raise HistoryHole and leave `out` as it was."""
    if until is None:
        until = await log.latest_id(strategy)
    with _replaced(out) as file:
        writer = WRITERS[fmt](file)
        after, rows, events = since, 0, 0
        while True:
            page = await read(log, store, strategy, epoch=epoch, after_id=after, until_id=until, limit=page_size)
            if not page.covered:
                raise HistoryHole(strategy, page.reason, since, until)
            epoch = page.epoch
            assert epoch is not None
            rows += writer.write(page.events, epoch)
            events += len(page.events)
            progress(len(page.events))
            if not page.truncated or not page.events:
                break
            after = page.events[-1].id
        writer.close()
    return Exported(rows, events, epoch, until)


@contextmanager
def _replaced(out: Path) -> Iterator[IO[bytes]]:
    """A temporary file beside `out`, renamed to `out` when the block succeeds, removed when not."""
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as file:
            yield file
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600, as if the file had been opened plainly
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
