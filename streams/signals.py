"""Strategy signals in PostgreSQL and their outbox; this module is the one writer of both.

Every change (add, update, remove, import) runs in one transaction that also writes one
`signal_outbox` row per change and a NOTIFY; the relay (agents/relay.py) moves outbox rows
to the `signals` topic in id order. The edge reads the list from here too.

Commit order. A bigserial id is handed out at INSERT, not at COMMIT: with two writers open at
once, id 6 can commit before id 5, and a reader taking `id > last` would read 6, move past 5
and never see it. So every writer takes one transaction-level advisory lock as its first
statement and holds it to COMMIT (PostgreSQL releases it only after the commit is visible):
outbox writers run one at a time and ids are handed out in commit order. Once a reader sees
id n, every smaller id is committed (and visible to it) or rolled back for good; gaps are
rollbacks, never rows still to come. Signal changes are a few hundred a day, so one writer at
a time costs nothing. The alternatives were worse here: reading by xid visibility
(pg_snapshot_xmin) makes the relay hold back behind every open transaction in the database,
and commit timestamps need `track_commit_timestamp` and a server restart.
"""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import asyncpg
from pydantic import ValidationError

from schemas.events import Signal, SignalChange
from schemas.market import parse_ts_code
from streams.errors import BadSignals, SignalNotFound, pg_translated
from streams.keys import check_name

# LISTEN/NOTIFY channel of new outbox rows; the payload is the writer's schema, so relays of
# deployments that share a database (tests: a schema each) wake only for their own rows
NOTIFY_CHANNEL = "tickwave_signal_outbox"
_WRITE_LOCK = "SELECT pg_advisory_xact_lock(hashtext('tickwave.signal_outbox.' || current_schema()))"
_LEAD_LOCK = "SELECT pg_try_advisory_lock(hashtext('tickwave.signal_relay.' || current_schema()))"

_FIELDS = ("strategy", "ts_code", "name", "side", "signal_date", "signal_price", "confidence", "reason")
_SELECT = f"SELECT {', '.join(_FIELDS)} FROM signals"
_UPSERT = (
    f"INSERT INTO signals ({', '.join(_FIELDS)}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
    "ON CONFLICT (strategy, ts_code) DO UPDATE SET name = EXCLUDED.name, side = EXCLUDED.side, "
    "signal_date = EXCLUDED.signal_date, signal_price = EXCLUDED.signal_price, "
    "confidence = EXCLUDED.confidence, reason = EXCLUDED.reason, updated_at = now()"
)
# one statement for a transaction's outbox rows, ids in the order of the changes, one commit
# time for all (clock_timestamp() read once, by an uncorrelated subquery, just before COMMIT)
_OUTBOX_INSERT = (
    "INSERT INTO signal_outbox (strategy, ts_code, action, change, committed_at) "
    "SELECT s, c, a, j, (SELECT clock_timestamp()) FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) "
    "WITH ORDINALITY AS u(s, c, a, j, n) ORDER BY n"
)


def _signal(record: asyncpg.Record | dict[str, Any]) -> Signal:
    return Signal(**dict(record))


def _values(signal: Signal) -> tuple[Any, ...]:
    return tuple(getattr(signal, f) for f in _FIELDS)


def plan(current: Iterable[Signal], wanted: Iterable[Signal], *, replace: bool = False) -> list[SignalChange]:
    """The changes that turn `current` into `wanted` (pure): removes first when `replace`
    (every current signal `wanted` lacks), then an add per new or different signal, in
    `wanted`'s order. Unchanged signals give nothing, so applying a plan twice changes nothing."""
    have = {(s.strategy, s.ts_code): s for s in current}
    want = {(s.strategy, s.ts_code): s for s in wanted}
    changes = []
    if replace:
        changes += [SignalChange(action="remove", signal=have[k]) for k in sorted(have.keys() - want.keys())]
    changes += [SignalChange(action="add", signal=s) for k, s in want.items() if have.get(k) != s]
    return changes


class ImportResult(NamedTuple):
    added: int
    updated: int
    removed: int
    unchanged: int


class SignalChanges:
    """The changes of one transaction (`SignalStore.transaction`); each is written at once,
    and its outbox rows go in, ids in call order, just before COMMIT."""

    def __init__(self, conn: asyncpg.Connection):
        self.conn = conn
        self.changes: list[SignalChange] = []

    async def current(self, strategies: Iterable[str]) -> list[Signal]:
        """The signals of these strategies as this transaction sees them."""
        names = sorted({check_name(s, "strategy") for s in strategies})
        records = await self.conn.fetch(f"{_SELECT} WHERE strategy = ANY($1::text[])", names)
        return [_signal(r) for r in records]

    async def get(self, strategy: str, ts_code: str) -> Signal | None:
        """One signal as this transaction sees it, or None."""
        record = await self.conn.fetchrow(f"{_SELECT} WHERE strategy = $1 AND ts_code = $2", strategy, ts_code)
        return _signal(record) if record else None

    async def apply(self, changes: Sequence[SignalChange]) -> None:
        """Write planned changes (see `plan`) and queue their outbox rows."""
        removes = [(c.signal.strategy, c.signal.ts_code) for c in changes if c.action == "remove"]
        adds = [_values(c.signal) for c in changes if c.action == "add"]
        for c in changes:
            check_name(c.signal.strategy, "strategy")
        if removes:
            await self.conn.executemany("DELETE FROM signals WHERE strategy = $1 AND ts_code = $2", removes)
        if adds:
            await self.conn.executemany(_UPSERT, adds)
        self.changes += changes

    async def add(self, signal: Signal) -> str:
        """Add or replace one signal: "added", "updated" or "unchanged" (nothing written)."""
        check_name(signal.strategy, "strategy")
        before = await self.get(signal.strategy, signal.ts_code)
        if before == signal:
            return "unchanged"
        await self.apply([SignalChange(action="add", signal=signal)])
        return "added" if before is None else "updated"

    async def remove(self, strategy: str, ts_code: str) -> Signal:
        """Remove one signal and return it; SignalNotFound (nothing written) when it is not there."""
        code = parse_ts_code(ts_code)
        before = await self.get(check_name(strategy, "strategy"), code)
        if before is None:
            raise SignalNotFound(f"strategy {strategy!r} has no signal on {code}")
        await self.apply([SignalChange(action="remove", signal=before)])
        return before

    async def _flush(self) -> None:
        if not self.changes:
            return
        cols: tuple[list[str], list[str], list[str], list[str]] = ([], [], [], [])
        for c in self.changes:
            for col, value in zip(cols, (c.signal.strategy, c.signal.ts_code, c.action, c.model_dump_json())):
                col.append(value)
        await self.conn.execute(_OUTBOX_INSERT, *cols)
        # delivered at COMMIT, and only if it commits: a relay never wakes for a rolled-back change
        await self.conn.execute("SELECT pg_notify($1, current_schema())", NOTIFY_CHANNEL)


class SignalStore:
    """Signals and their outbox through the process's pool."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SignalChanges]:
        """One transaction holding the outbox write lock; its changes commit together with
        their outbox rows, or neither does."""
        with pg_translated("signals write"):
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(_WRITE_LOCK)  # first statement: ids in commit order (see above)
                changes = SignalChanges(conn)
                yield changes
                await changes._flush()

    async def add(self, signal: Signal) -> str:
        """Add or replace a signal: "added", "updated" or "unchanged"."""
        async with self.transaction() as tx:
            return await tx.add(signal)

    async def remove(self, strategy: str, ts_code: str) -> Signal:
        """Remove a signal; SignalNotFound when the strategy has none on that code."""
        async with self.transaction() as tx:
            return await tx.remove(strategy, ts_code)

    async def import_signals(self, signals: Sequence[Signal], *, replace: bool = False) -> ImportResult:
        """Make the list hold `signals`, in one transaction: new and changed ones are added,
        unchanged ones written nowhere (a re-import adds no outbox row); with `replace`, the
        signals of the file's strategies that the file lacks are removed."""
        check_unique(signals)
        async with self.transaction() as tx:
            current = await tx.current(s.strategy for s in signals)
            changes = plan(current, signals, replace=replace)
            await tx.apply(changes)
        have = {(s.strategy, s.ts_code) for s in current}
        added = sum(1 for c in changes if c.action == "add" and (c.signal.strategy, c.signal.ts_code) not in have)
        removed = sum(1 for c in changes if c.action == "remove")
        updated = len(changes) - added - removed
        return ImportResult(added, updated, removed, len(signals) - added - updated)

    async def signals(self, strategy: str | None = None, side: str | None = None) -> list[Signal]:
        """Current signals (of one strategy, of one side), newest signal date first."""
        return [_signal(r) for r in await self.records(strategy, side)]

    async def last_change(self) -> int:
        """The newest outbox id: it moves with every committed change, and only then (ids are
        handed out in commit order), so a reader can keep what it built until it moves."""
        with pg_translated("signals read"):
            return int(await self.pool.fetchval("SELECT coalesce(max(id), 0) FROM signal_outbox", timeout=5))

    async def records(self, strategy: str | None = None, side: str | None = None) -> list[asyncpg.Record]:
        """The list as rows (the edge's hot path builds its JSON from these without models)."""
        if strategy is not None:
            check_name(strategy, "strategy")
        with pg_translated("signals read"):
            return await self.pool.fetch(
                f"{_SELECT} WHERE ($1::text IS NULL OR strategy = $1) AND ($2::text IS NULL OR side = $2) "
                "ORDER BY strategy, signal_date DESC, ts_code",
                strategy, side, timeout=5,
            )


def check_unique(signals: Sequence[Signal]) -> None:
    """BadSignals when two signals share a strategy and code (which one would win is a guess)."""
    seen: set[tuple[str, str]] = set()
    dupes = []
    for s in signals:
        key = (s.strategy, s.ts_code)
        if key in seen:
            dupes.append(f"{s.strategy} {s.ts_code}")
        seen.add(key)
    if dupes:
        raise BadSignals("more than one signal for: " + ", ".join(dupes[:10]))


# --- CSV ----------------------------------------------------------------------
CSV_COLUMNS = _FIELDS


def _csv_date(raw: str) -> str:
    """ISO text from YYYYMMDD, the way Tushare and most A-share tools write trade dates (pydantic
    reads a run of digits as a Unix timestamp and refuses it)."""
    raw = raw.strip()
    if len(raw) == 8 and raw.isdigit():
        return f"{raw[:4]}-{raw[4:6]}-{raw[6:]}"
    return raw


def read_csv(text: str, strategy: str | None = None) -> list[Signal]:
    """Signals from CSV text with a header row (columns `CSV_COLUMNS`; `ts_code` and
    `signal_date` required, `strategy` unless given here); BadSignals names every bad line."""
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    unknown = [h for h in header if h not in CSV_COLUMNS]
    missing = [h for h in ("ts_code", "signal_date") if h not in header]
    if "strategy" in header and strategy is not None:
        raise BadSignals("the file has a strategy column; leave out the strategy option")
    if "strategy" not in header and strategy is None:
        missing.append("strategy")
    if unknown or missing:
        raise BadSignals("CSV header: " + "; ".join(
            ([f"unknown column(s) {', '.join(unknown)} (known: {', '.join(CSV_COLUMNS)})"] if unknown else [])
            + ([f"missing column(s) {', '.join(missing)}"] if missing else [])))
    out: list[Signal] = []
    problems: list[str] = []
    for row in reader:
        doc: dict[str, Any] = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        if not any(doc.values()):
            continue  # blank line
        if strategy is not None:
            doc["strategy"] = strategy
        doc["signal_date"] = _csv_date(doc["signal_date"])
        for optional in ("signal_price", "confidence"):
            if doc.get(optional) == "":
                doc[optional] = None
        for defaulted in ("name", "reason", "side"):
            if doc.get(defaulted) == "":
                del doc[defaulted]
        try:
            signal = Signal.model_validate(doc)
            check_name(signal.strategy, "strategy")
            out.append(signal)
        except (ValidationError, ValueError) as exc:
            detail = ("; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                                for e in exc.errors(include_url=False))
                      if isinstance(exc, ValidationError) else str(exc))
            problems.append(f"line {reader.line_num}: {detail}")
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise BadSignals("; ".join(problems[:20]) + more)
    check_unique(out)
    return out


# --- the relay's side ---------------------------------------------------------
class OutboxRow(NamedTuple):
    id: int
    ts_code: str
    change: str  # the SignalChange JSON, as the topic carries it
    committed_ms: int


class Backlog(NamedTuple):
    rows: int  # outbox rows not yet relayed
    oldest_age_s: float  # age of the oldest of them (0 when none)


class Outbox:
    """The relay's view of the outbox, on one dedicated connection: its leadership lock and
    LISTEN live with that session and end with it."""

    def __init__(self, conn: asyncpg.Connection):
        self.conn = conn
        self._schema: str | None = None

    async def try_lead(self) -> bool:
        """Take the relay leadership (a session advisory lock) if no other session holds it."""
        with pg_translated("relay leadership"):
            return bool(await self.conn.fetchval(_LEAD_LOCK))

    async def listen(self, wake: asyncio.Event) -> None:
        """Set `wake` on every committed outbox write of this schema."""
        with pg_translated("listen for outbox rows"):
            self._schema = await self.conn.fetchval("SELECT current_schema()")

            def notified(_conn: object, _pid: int, _channel: str, payload: str) -> None:
                if payload == self._schema:
                    wake.set()

            await self.conn.add_listener(NOTIFY_CHANNEL, notified)

    async def after(self, after_id: int, limit: int) -> list[OutboxRow]:
        """Committed rows with id > after_id, in id order (= commit order, see the module doc)."""
        with pg_translated("outbox read"):
            records = await self.conn.fetch(
                "SELECT id, ts_code, change, (extract(epoch FROM committed_at) * 1000)::bigint AS ms "
                "FROM signal_outbox WHERE id > $1 ORDER BY id LIMIT $2", after_id, limit)
        return [OutboxRow(r["id"], r["ts_code"], r["change"], r["ms"]) for r in records]

    async def mark_relayed(self, up_to: int) -> None:
        """Record that every row up to `up_to` is in the topic."""
        with pg_translated("outbox mark"):
            await self.conn.execute(
                "UPDATE signal_outbox SET relayed_at = clock_timestamp() WHERE id <= $1 AND relayed_at IS NULL",
                up_to)

    async def last_id(self) -> int:
        """The highest id ever handed out (the sequence, not max(id): relayed rows may be deleted)."""
        with pg_translated("outbox read"):
            return int(await self.conn.fetchval(
                "SELECT coalesce(pg_sequence_last_value(pg_get_serial_sequence('signal_outbox', 'id')::regclass), 0)"))

    async def backlog(self) -> Backlog:
        with pg_translated("outbox backlog"):
            row = await self.conn.fetchrow(
                "SELECT count(*) AS n, coalesce(extract(epoch FROM clock_timestamp() - min(committed_at)), 0) AS age "
                "FROM signal_outbox WHERE relayed_at IS NULL")
        return Backlog(int(row["n"]), max(0.0, float(row["age"])))
