"""The signals relay: outbox rows to the faust topic `signals`, in commit order, each once.

Order. Outbox ids are handed out in commit order (streams/signals.py takes a write lock), so
reading `id > last` in id order never skips a row that commits later. Rows are appended in
id order, one run of same-partition rows per call, each call awaited before the next: so
whenever the topic holds id n, it holds every committed id below n.

Resume. The topic itself is the position: on taking over, and after any append that failed or
whose outcome is unknown, a relay reads every partition's newest record and continues after the
highest `outbox_id` header among them. Nothing in PostgreSQL can disagree with it
(`relayed_at` is bookkeeping for the backlog metrics, written after the append).

Fencing. Every append is conditional on the partition's next offset, checked inside the append
script (streams/append_records.lua): a relay appends only where it last saw the partition end.
A second writer (a standby that took over while an old leader, cut off from PostgreSQL, still
had rows in flight; or a reply lost and the append retried) makes the other's append fail with
OffsetConflict and write nothing, and the loser resynchronises from the topic. So the topic
never holds a row twice or out of id order, whatever the relays do; the session advisory lock
(leadership) only keeps a standby from doing the same work, and LISTEN/NOTIFY with a polling
fallback only decides how soon a row moves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from streams import pg
from streams.codec import EncodedRecord, Record, encode_record
from streams.connection import AnyRedis
from streams.errors import ArchiveUnavailable, CorruptEntry, OffsetConflict, StreamUnavailable
from streams.keys import Keys
from streams.log import PartitionLog
from streams.partition import partition_for
from streams.signals import Outbox, OutboxRow
from streams.topics import declare

log = logging.getLogger("tickwave.relay")

TOPIC = "signals"
TICKS = "ticks"
HEADER = "outbox_id"
APPLICATION_NAME = "tickwave-relay"  # how the relays' sessions show in pg_stat_activity

RELAYED = Counter("tickwave_relay_relayed_total", "Outbox rows appended to the signals topic")
ERRORS = Counter("tickwave_relay_errors_total", "Relay failures: postgres, redis, conflict", ["kind"])
BACKLOG = Gauge("tickwave_relay_backlog_rows", "Outbox rows not yet relayed")
LAG = Gauge("tickwave_relay_lag_seconds", "Age of the oldest outbox row not yet relayed")
LEADER = Gauge("tickwave_relay_leader", "1 while this process is the leading relay")


class RelayError(Exception):
    """The relay cannot write the topic safely; it stops rather than guess (the message says why)."""


async def signals_partitions(client: AnyRedis, keys: Keys, tick_partitions: int) -> int:
    """Declare `signals` with the ticks topic's stored partition count (the join is
    co-partitioned on ts_code); RelayError if `signals` already exists with another count."""
    ticks = (await declare(client, keys, [TICKS], partitions=tick_partitions))[TICKS].partitions
    signals = (await declare(client, keys, [TOPIC], partitions=ticks))[TOPIC].partitions
    if signals != ticks:
        raise RelayError(f"topic {TOPIC!r} has {signals} partitions and {TICKS!r} {ticks}: the join "
                         f"needs them equal; recreate {TOPIC!r} (the relay refills it from the outbox)")
    return ticks


def outbox_id(record: Record, partition: int) -> int:
    """The outbox id a relayed record carries; RelayError for a record the relay did not write."""
    for name, value in record.headers:
        if name == HEADER and value.isdigit():
            return int(value)
    raise RelayError(f"{TOPIC} partition {partition} offset {record.offset} has no {HEADER} header: "
                     f"something other than the relay writes to {TOPIC!r}")


def encode_row(row: OutboxRow) -> EncodedRecord:
    """The topic record of one outbox row: key ts_code, value the SignalChange JSON, header
    `outbox_id`, timestamp the row's commit time."""
    return encode_record(row.ts_code.encode(), row.change.encode(), {HEADER: str(row.id).encode()}, row.committed_ms)


def runs(rows: Sequence[OutboxRow], partitions: int) -> list[tuple[int, list[OutboxRow]]]:
    """Consecutive rows that go to the same partition, in id order (pure)."""
    out: list[tuple[int, list[OutboxRow]]] = []
    for row in rows:
        p = partition_for(row.ts_code, partitions)
        if out and out[-1][0] == p:
            out[-1][1].append(row)
        else:
            out.append((p, [row]))
    return out


class TopicWriter:
    """Appends outbox rows to the signals topic, fenced on each partition's offset."""

    def __init__(self, client: AnyRedis, keys: Keys, partitions: int):
        self.log = PartitionLog(client, keys, TOPIC)
        self.partitions = partitions
        self.last_id = 0  # highest outbox id known to be in the topic
        self._next: dict[int, int] = {}

    async def resync(self) -> int:
        """Read where the topic ends; returns the highest outbox id it holds (0: none)."""
        try:
            tails = await self.log.tails(self.partitions)
        except CorruptEntry as exc:
            raise RelayError(f"{TOPIC!r} ends in an entry the relay cannot read: {exc}") from None
        self._next = {p: t.next_offset for p, t in tails.items()}
        self.last_id = max((outbox_id(t.last, p) for p, t in tails.items() if t.last is not None), default=0)
        return self.last_id

    async def write(self, rows: Sequence[OutboxRow], on_landed: Callable[[int], None] | None = None) -> None:
        """Append rows (ids above `last_id`, ascending), one run per call, each awaited.
        OffsetConflict or StreamUnavailable leave `last_id` at the last run that landed for
        sure; the caller must then `resync`."""
        if not self._next:
            raise RuntimeError("resync before writing")
        if rows and rows[0].id <= self.last_id:
            raise ValueError(f"row {rows[0].id} is not after {self.last_id}")
        for p, run in runs(rows, self.partitions):
            await self.log.append(p, [encode_row(r) for r in run], expected=self._next[p])
            self._next[p] += len(run)
            self.last_id = run[-1].id
            if on_landed:
                on_landed(len(run))


@dataclass
class RelayStats:
    relayed: int = 0
    resyncs: int = 0
    conflicts: int = 0
    terms: int = 0  # times this relay took the lead
    last_id: int = 0


class Relay:
    """One relay process: waits to lead, then moves outbox rows until stopped."""

    def __init__(
        self,
        client: AnyRedis,
        keys: Keys,
        database_url: str,
        *,
        tick_partitions: int = 8,
        batch: int = 500,
        poll_s: float = 1.0,
        standby_s: float = 1.0,
        metrics_every_s: float = 5.0,
        on_progress: Callable[[RelayStats], None] | None = None,
    ):
        self.client, self.keys, self.database_url = client, keys, database_url
        self.tick_partitions, self.batch = tick_partitions, batch
        self.poll_s, self.standby_s, self.metrics_every_s = poll_s, standby_s, metrics_every_s
        self.on_progress = on_progress
        self.stats = RelayStats()
        self._last_metrics = 0.0

    async def run(self, stop: asyncio.Event) -> RelayStats:
        """Relay until `stop` is set; PostgreSQL or Redis going away is retried with backoff
        (leadership goes with the PostgreSQL session). RelayError stops it."""
        backoff = 0.5
        writer: TopicWriter | None = None
        while not stop.is_set():
            try:
                if writer is None:
                    partitions = await signals_partitions(self.client, self.keys, self.tick_partitions)
                    writer = TopicWriter(self.client, self.keys, partitions)
                # a query that hangs (PostgreSQL gone without a reset) ends the session like an error
                async with pg.connection(self.database_url, command_timeout=30,
                                         server_settings={"application_name": APPLICATION_NAME}) as conn:
                    await self._session(Outbox(conn), writer, stop)
                backoff = 0.5
            except (ArchiveUnavailable, StreamUnavailable) as exc:
                kind = "postgres" if isinstance(exc, ArchiveUnavailable) else "redis"
                ERRORS.labels(kind).inc()
                log.warning(f"{kind} unavailable; retrying", extra={"error": str(exc), "retry_in_s": backoff})
                await _wait_any(stop, timeout=backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                LEADER.set(0)
        return self.stats

    async def _session(self, outbox: Outbox, writer: TopicWriter, stop: asyncio.Event) -> None:
        wake = asyncio.Event()
        await outbox.listen(wake)  # before the first read, so no commit after it goes unnoticed
        while not await outbox.try_lead():
            await self._metrics(outbox, force=True)  # a standby reports the backlog too
            if await _wait_any(stop, timeout=self.standby_s):
                return
        LEADER.set(1)
        self.stats.terms += 1
        await self._resync(outbox, writer)
        log.info("leading the signals relay", extra={"resume_after": writer.last_id})
        while not stop.is_set():
            wake.clear()  # before the read: a NOTIFY during it wakes the next wait
            rows = await outbox.after(writer.last_id, self.batch)
            if rows:
                try:
                    await writer.write(rows, self._landed)
                except OffsetConflict as exc:
                    # another writer appended to the topic: an old leader's last rows, or our own
                    # append retried after a lost reply. Nothing of ours landed twice; read again.
                    ERRORS.labels("conflict").inc()
                    self.stats.conflicts += 1
                    log.warning("signals topic moved under the relay; resynchronising", extra={"error": str(exc)})
                    await self._resync(outbox, writer)
                    continue
                except StreamUnavailable:
                    self.stats.last_id = writer.last_id
                    raise  # outcome of the last run unknown: the retry resynchronises
                await outbox.mark_relayed(writer.last_id)
                self.stats.last_id = writer.last_id
                if self.on_progress:
                    self.on_progress(self.stats)
                await self._metrics(outbox)
                continue
            await self._metrics(outbox, force=True)
            await _wait_any(stop, wake, timeout=self.poll_s)
        log.info("relay stopping", extra={"last_id": writer.last_id})

    def _landed(self, n: int) -> None:
        RELAYED.inc(n)
        self.stats.relayed += n

    async def _resync(self, outbox: Outbox, writer: TopicWriter) -> None:
        last = await writer.resync()
        self.stats.resyncs += 1
        newest = await outbox.last_id()
        if last > newest:
            raise RelayError(f"{TOPIC!r} holds outbox id {last} but the outbox ends at {newest}: the topic was "
                             "filled from another database (or this one was restored from a backup)")
        await outbox.mark_relayed(last)
        self.stats.last_id = last

    async def _metrics(self, outbox: Outbox, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_metrics < self.metrics_every_s:
            return
        self._last_metrics = time.monotonic()
        backlog = await outbox.backlog()
        BACKLOG.set(backlog.rows)
        LAG.set(backlog.oldest_age_s)


async def _wait_any(*events: asyncio.Event, timeout: float) -> bool:
    """Wait until any event is set or `timeout` passes; True if the first (stop) is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    return events[0].is_set()
