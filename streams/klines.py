"""K-line bar streams: one per stock, in its ticks partition's slot, and their PostgreSQL archive.

`BarLog.append` is the only way a bar is written: one Lua script per ticks partition
(streams/append_bars.lua) appends each closed bar once (fenced by the bar's start against
the stream's newest entry), records the stock in the partition's set, and trims each stream
to `maxlen` without passing the newest bar the archive holds. Entry ids are Redis time ids:
the public event ids a `kline` subscriber resumes from. Entries are `s` the bar's start (ms),
`e` its JSON without the event id, `c` the codec version.

`bar_history` reads one stock's bars, Redis then the archive, as one ordered list.
"""

from __future__ import annotations

import secrets
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files
from typing import Any, cast

import asyncpg
import orjson
from pydantic import ValidationError

from schemas.klines import Bar
from streams.codec import CODEC_VERSION, parse_id
from streams.connection import AnyRedis, execute
from streams.errors import CorruptEntry, pg_translated, translated
from streams.keys import Keys
from streams.partition import partition_for

_APPEND_LUA = files("streams").joinpath("append_bars.lua").read_text()
DEFAULT_MAXLEN = 480  # two sessions of 1-minute bars per stock; the archive keeps the rest
LIVE_MAXLEN = 120  # entries of a partition's live stream: two minutes at one a second

RawEntry = tuple[bytes, dict[bytes, bytes]]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def encode_bar(bar: Bar) -> bytes:
    return bar.model_dump_json(exclude={"event_id"}).encode()


def decode_bar(entry_id: bytes | str, fields: dict[bytes, bytes]) -> Bar:
    """One bar entry, its id as the event id; CorruptEntry when unreadable."""
    eid = _text(entry_id)
    if fields.get(b"c") != CODEC_VERSION:
        raise CorruptEntry(f"unknown bar codec version {fields.get(b'c')!r}", eid)
    try:
        return Bar.model_validate_json(fields[b"e"]).model_copy(update={"event_id": eid})
    except (KeyError, ValueError, ValidationError) as exc:
        raise CorruptEntry(f"undecodable bar: {str(exc).splitlines()[0]}", eid) from None


def decode_open(entry_id: bytes | str, fields: dict[bytes, bytes], wanted: Container[str] | None = None) -> list[Bar]:
    """The partial bars of one live-stream entry (no event ids), only those of `wanted` stocks
    when given (an entry holds a whole partition's); CorruptEntry when unreadable."""
    eid = _text(entry_id)
    if fields.get(b"c") != CODEC_VERSION:
        raise CorruptEntry(f"unknown bar codec version {fields.get(b'c')!r}", eid)
    try:
        rows = orjson.loads(fields[b"b"])
        return [Bar.model_validate(r) for r in rows if wanted is None or r.get("ts_code") in wanted]
    except (KeyError, ValueError, AttributeError, ValidationError) as exc:
        raise CorruptEntry(f"undecodable open bars: {str(exc).splitlines()[0]}", eid) from None


def bar_ms(bar: Bar) -> int:
    return int(bar.start.timestamp() * 1000)


class BarLog:
    """Append to and read the bar streams of one deployment (one key prefix)."""

    def __init__(self, client: AnyRedis, keys: Keys, *, maxlen: int = DEFAULT_MAXLEN, hold: bool = True):
        """`hold`: trimming never removes a bar the archiver has not archived (an archiver runs)."""
        self.client, self.keys = client, keys
        self.maxlen, self.hold = maxlen, hold
        self._script = client.register_script(_APPEND_LUA)

    def stream_key(self, ts_code: str, partitions: int) -> str:
        return self.keys.kline(partition_for(ts_code, partitions), ts_code)

    async def append(self, partition: int, bars: Sequence[Bar]) -> list[str | None]:
        """Append a ticks partition's closed bars (a stock's in start order); the ids written,
        None for a bar appended before."""
        if not bars:
            return []
        k = self.keys
        keys = [k.kline_epoch(partition), k.kline_codes(partition), k.kline_archived(partition),
                *(k.kline(partition, b.ts_code) for b in bars)]
        args: list[Any] = [secrets.token_hex(8), self.maxlen, "1" if self.hold else "0", CODEC_VERSION]
        for bar in bars:
            args += [bar.ts_code, bar_ms(bar), encode_bar(bar)]
        with translated(f"append bars of partition {partition}"):
            reply = await self._script(keys=keys, args=args)
        return [_text(i) or None for i in reply[1:]]

    async def publish_open(self, partition: int, bars: Sequence[Bar]) -> str | None:
        """One entry on the partition's live stream holding its stocks' open (partial) bars: a
        subscriber's `closed: false` updates. Not exactly-once and not resumable (a partial bar
        is superseded by the next one and by the closed bar); capped at LIVE_MAXLEN entries."""
        if not bars:
            return None
        body = b"[" + b",".join(encode_bar(b) for b in bars) + b"]"
        with translated(f"publish open bars of partition {partition}"):
            eid = await self.client.xadd(self.keys.kline_live(partition), {"b": body, "c": CODEC_VERSION},
                                         maxlen=LIVE_MAXLEN, approximate=True)
        return _text(eid)

    async def epoch(self, partition: int) -> str | None:
        with translated("read the bar epoch"):
            raw = await self.client.get(self.keys.kline_epoch(partition))
        return _text(raw) if raw else None

    async def read(self, key: str, after_id: str | None = None, until_id: str | None = None,
                   count: int | None = None) -> list[Bar]:
        """Bars of one stream with after_id < id <= until_id, oldest first; corrupt ones skipped."""
        low = f"({after_id}" if after_id else "-"
        with translated(f"read bars {key}"):
            raw = cast(list[RawEntry], await self.client.xrange(key, min=low, max=until_id or "+", count=count))
        return decoded(raw)

    async def newest_id(self, key: str) -> str | None:
        with translated(f"read bars {key}"):
            raw = cast(list[RawEntry], await self.client.xrevrange(key, count=1))
        return _text(raw[0][0]) if raw else None

    async def trimmed(self, key: str) -> bool:
        """Whether bars were ever trimmed from the stream (Redis 7 counts what was added)."""
        with translated(f"stream info of {key}"):
            try:
                info = await self.client.xinfo_stream(key)
            except Exception:  # noqa: BLE001 - no such stream: nothing was trimmed
                return False
        added = info.get("entries-added")
        return added is not None and int(added) > int(info.get("length", 0))

    async def day_of_newest(self, key: str) -> list[Bar]:
        """The bars of the trading day of the stream's newest bar (a subscriber's snapshot)."""
        newest = await self.read_newest(key)
        if newest is None:
            return []
        day = newest.start.replace(hour=0, minute=0, second=0, microsecond=0)
        with translated(f"read bars {key}"):
            raw = cast(list[RawEntry], await self.client.xrange(key, min=f"{int(day.timestamp() * 1000)}-0"))
        return [b for b in decoded(raw) if b.start >= day]

    async def read_newest(self, key: str) -> Bar | None:
        with translated(f"read bars {key}"):
            raw = cast(list[RawEntry], await self.client.xrevrange(key, count=1))
        got = decoded(raw)
        return got[0] if got else None

    async def partition_codes(self, partition: int) -> list[str]:
        with translated("read bar codes"):
            return sorted(_text(c) for c in await self.client.smembers(self.keys.kline_codes(partition)))


def decoded(raw: Iterable[RawEntry]) -> list[Bar]:
    out = []
    for eid, fields in raw:
        try:
            out.append(decode_bar(eid, fields))
        except CorruptEntry:
            continue  # the archiver dead-letters it; readers leave it out
    return out


# --- the archive ------------------------------------------------------------
_COLUMNS = ("ts_code", "epoch", "ms", "seq", "start", "bar")


class BarArchive:
    """`kline_archive` (infra/migrations/0004_kline_archive.sql): 1-minute bars beyond Redis."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def write(self, epoch: str, bars: Sequence[Bar]) -> int:
        """Insert bars not archived yet (by stock, epoch and id); returns rows inserted."""
        if not bars:
            return 0
        rows = []
        for bar in bars:
            assert bar.event_id is not None
            ms, seq = parse_id(bar.event_id)
            rows.append((bar.ts_code, epoch, ms, seq, bar.start, encode_bar(bar).decode()))
        with pg_translated("bar archive write"):
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute("CREATE TEMP TABLE IF NOT EXISTS kline_stage "
                                   "(LIKE kline_archive INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
                await conn.copy_records_to_table("kline_stage", records=rows, columns=_COLUMNS)
                status = await conn.execute(f"INSERT INTO kline_archive ({', '.join(_COLUMNS)}) SELECT "
                                            f"{', '.join(_COLUMNS)} FROM kline_stage ON CONFLICT DO NOTHING")
        return int(status.rsplit(" ", 1)[-1])

    async def read(self, ts_code: str, epoch: str, *, before_id: str | None, since: datetime | None = None,
                   until: datetime | None = None) -> list[Bar]:
        """Archived bars of a stock's epoch with id < before_id (and since <= start <= until), oldest first."""
        high = parse_id(before_id) if before_id else (2**62, 2**62)
        with pg_translated("bar archive read"):
            records = await self.pool.fetch(
                "SELECT ms, seq, bar::text AS bar FROM kline_archive WHERE ts_code = $1 AND epoch = $2 "
                "AND (ms, seq) < ($3, $4) AND ($5::timestamptz IS NULL OR start >= $5) "
                "AND ($6::timestamptz IS NULL OR start <= $6) ORDER BY ms, seq",
                ts_code, epoch, high[0], high[1], since, until)
        return [Bar.model_validate_json(r["bar"]).model_copy(update={"event_id": f"{r['ms']}-{r['seq']}"})
                for r in records]

    async def last_id(self, ts_code: str, epoch: str) -> str | None:
        with pg_translated("bar archive read"):
            row = await self.pool.fetchrow("SELECT ms, seq FROM kline_archive WHERE ts_code = $1 AND epoch = $2 "
                                           "ORDER BY ms DESC, seq DESC LIMIT 1", ts_code, epoch)
        return f"{row['ms']}-{row['seq']}" if row else None


@dataclass(frozen=True)
class BarHistory:
    bars: list[Bar]
    covered: bool  # False: bars were trimmed from Redis and the archive cannot show they are all here
    epoch: str | None


async def bar_history(log: BarLog, archive: BarArchive | None, ts_code: str, partitions: int, *,
                      after_id: str | None = None, since: datetime | None = None,
                      until: datetime | None = None, until_id: str | None = None) -> BarHistory:
    """One stock's 1-minute bars after `after_id` (and within since..until by start), Redis then the archive."""
    partition = partition_for(ts_code, partitions)
    key = log.keys.kline(partition, ts_code)
    epoch = await log.epoch(partition)
    hot = await log.read(key, after_id, until_id)
    first_kept = await log.read(key, None, None, count=1)
    covered = True
    cold: list[Bar] = []
    needs_cold = await log.trimmed(key) and (
        after_id is None or not first_kept or parse_id(first_kept[0].event_id or "0-0") > parse_id(after_id))
    if needs_cold:
        if archive is None or epoch is None:
            covered = False
        else:
            before = first_kept[0].event_id if first_kept else None
            last = await archive.last_id(ts_code, epoch)
            # the archive must reach the oldest bar Redis keeps (they overlap by one): else a hole
            covered = last is not None and before is not None and parse_id(last) >= parse_id(before)
            cold = [b for b in await archive.read(ts_code, epoch, before_id=before, since=since, until=until)
                    if after_id is None or parse_id(b.event_id or "0-0") > parse_id(after_id)]
            if until_id:
                cold = [b for b in cold if parse_id(b.event_id or "0-0") <= parse_id(until_id)]
    bars = cold + [b for b in hot if (since is None or b.start >= since) and (until is None or b.start <= until)]
    return BarHistory(bars, covered, epoch)


async def partitions_with_bars(client: AnyRedis, keys: Keys, partitions: int) -> dict[int, list[str]]:
    """The stocks with bar streams, per ticks partition (one round trip)."""
    pipe = client.pipeline(transaction=False)
    for p in range(partitions):
        pipe.smembers(keys.kline_codes(p))
    replies = await execute(pipe, "read bar codes")
    return {p: sorted(_text(c) for c in codes) for p, codes in enumerate(replies) if codes}
