"""Per-strategy event streams: the pipeline's public record.

`EventLog.append_events` is the only way anything writes an event: one Lua
script per call (streams/append_events.lua) skips events whose tick position
is not newer than the last one recorded, appends the rest with Redis time ids
(the public event ids), keeps the snapshot hash and the epoch, and trims
without removing what the archive group has not acknowledged (up to a memory
ceiling, past which the loss is recorded as a gap in the same script).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, cast

from prometheus_client import Counter, Gauge
import redis.exceptions as rex
from redis.asyncio.cluster import PipelineCommand, RedisCluster

from schemas.events import Breadth, PriceChange
from streams.codec import (
    CODEC_VERSION,
    Event,
    StoredEvent,
    decode,
    encode_event_parts,
    event_fields,
    lazy,
    parse_id,
)
from streams.connection import AnyRedis
from streams.errors import CorruptEntry, translated
from streams.keys import Keys, check_name

RawEntry = tuple[bytes, dict[bytes, bytes]]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


_APPEND_LUA = files("streams").joinpath("append_events.lua").read_text()
DEFAULT_RETENTION_MS = 24 * 3600 * 1000
DEFAULT_ARCHIVE_GROUP = "archiver"
DEFAULT_HOLD_MAX_BYTES = 1 << 30

log = logging.getLogger("tickwave.events")
LOSS_LOG_S = 10.0
# ids of its own appends a writer keeps per strategy to count what a failover lost (cluster only)
RECENT_IDS = 10_000

HELD_BYTES = Gauge(
    "tickwave_events_retention_held_bytes",
    "Memory of a strategy stream whose trimming the archive group holds back, at the last append (0: not held)",
    ["strategy"],
)
HOLD_CEILING = Gauge(
    "tickwave_events_retention_hold_ceiling_bytes",
    "TICKWAVE_EVENT_HOLD_MAX_BYTES of this writer (0: no ceiling, or no archive group holds)",
)
FAILOVER_REGRESSIONS = Counter(
    "tickwave_events_failover_regressions_total",
    "Appends that found a strategy stream on another server than the last one (a replica promoted): "
    "ids the old master acknowledged after the recorded last id are lost",
    ["strategy"],
)
FAILOVER_LOST = Counter(
    "tickwave_events_failover_lost_total",
    "Events this writer appended that a failover lost (acknowledged by a master that died before "
    "its replica had them)",
    ["strategy"],
)
REPLICA_UNACKED = Counter(
    "tickwave_events_replica_unacknowledged_total",
    "Appends no replica acknowledged within TICKWAVE_WORKER_REPLICA_WAIT_MS (WAIT 1; Redis Cluster only): "
    "a failover of the stream's master now may lose them",
    ["strategy"],
)
FAILOVER_REUSED = Counter(
    "tickwave_events_failover_reused_positions_total",
    "Events whose tick positions a ticks-partition failover handed out again to new ticks "
    "(their own ticks were lost after the join read them; the events stay)",
    ["strategy"],
)
TRIMMED_UNARCHIVED = Counter(
    "tickwave_events_trimmed_unarchived_total",
    "Events trimmed past the hold ceiling before the archive group acknowledged them (recorded as a gap)",
    ["strategy"],
)


@dataclass(frozen=True)
class Gap:
    """Events of one epoch, ids first_id..last_id, that never reached the archive."""

    strategy: str
    epoch: str
    first_id: str
    last_id: str
    lost: int | None  # None: how many is not known
    reason: str  # 'ceiling': trimmed past the hold ceiling; 'trimmed', 'deleted': found by the archiver
    record_id: str | None = None  # the gap record in Redis it came from, if any

    def touches(self, after_id: str | None, until_id: str | None) -> bool:
        """Whether any id in (after_id, until_id] lies inside the gap."""
        return (after_id is None or parse_id(self.last_id) > parse_id(after_id)) and (
            until_id is None or parse_id(self.first_id) <= parse_id(until_id))


Position = tuple[str, int]


def _event_args(event: Event, source: Position | None, generation: tuple[int, int] | None = None
                ) -> list[bytes | str | int]:
    kind, version, body = encode_event_parts(event)
    if isinstance(event, PriceChange):
        position: list[bytes | str | int] = [event.source_partition, event.source_offset]
        snap: list[bytes | str | int] = [b"set", event.ts_code]
    elif isinstance(event, Breadth):
        # the `market` stream's snapshot is its newest entry: no snapshot hash row
        position = [source[0], source[1]] if source else ["", 0]
        snap = [b"", ""]
    else:
        position = [source[0], source[1]] if source else ["", 0]
        # a removed signal takes the stock out of the strategy's list
        snap = [b"del" if event.action == "remove" else b"", event.signal.ts_code]
    gen = f"{generation[0]}:{generation[1]}" if generation and generation[0] > 0 else ""
    return [*position, *snap, kind, version, body, gen]


class EventLog:
    """Append to and read the event streams of one deployment (one key prefix)."""

    def __init__(
        self,
        client: AnyRedis,
        keys: Keys,
        *,
        retention_ms: int | None = DEFAULT_RETENTION_MS,
        maxlen: int | None = None,
        archive_group: str | None = DEFAULT_ARCHIVE_GROUP,
        hold_max_bytes: int = DEFAULT_HOLD_MAX_BYTES,
        replica_wait_ms: int = 0,
    ):
        """`archive_group` holds retention: trimming never removes what it has not acknowledged
        until the stream's memory passes `hold_max_bytes` (0: no ceiling). None: nothing holds.
        `replica_wait_ms` > 0 (Redis Cluster only): each append is followed by WAIT 1 on the same
        connection, up to that long; an append no replica acknowledged in time is counted."""
        self.client = client
        self.keys = keys
        self._group, self._ceiling = archive_group or "", max(0, hold_max_bytes)
        if maxlen:
            self._retention: tuple[str, int] = ("maxlen", maxlen)
        elif retention_ms:
            self._retention = ("minid", retention_ms)
        else:
            self._retention = ("", 0)
        self._script = client.register_script(_APPEND_LUA)
        # the failover check (one INFO per append, streams/append_events.lua) only where a
        # replica can take over: a single server's user does not pay for it
        self._failover_check = isinstance(client, RedisCluster)
        self._wait_ms = replica_wait_ms if self._failover_check else 0
        # the ids this writer appended lately, per strategy (cluster only): counted as lost when a
        # failover record says the stream kept less; a failover detected later than this many
        # appends after it undercounts
        self._recent: defaultdict[str, deque[str]] = defaultdict(lambda: deque(maxlen=RECENT_IDS))
        self._failovers_seen: dict[str, int] = {}
        self._registered: set[str] = set()
        self._unlogged: dict[str, int] = {}
        self._loss_logged: dict[str, float] = {}

    def stream_key(self, strategy: str) -> str:
        return self.keys.events(strategy)

    def _keys_for(self, strategy: str) -> list[str]:
        k = self.keys
        keys = [k.events(strategy), k.epoch(strategy), k.snapshot(strategy), k.positions(strategy), k.gaps(strategy)]
        return [*keys, k.failovers(strategy)] if self._failover_check else keys

    async def append_events(
        self, strategy: str, events: Sequence[Event], *, sources: Sequence[Position | None] | None = None,
        generations: Sequence[tuple[int, int]] | None = None,
    ) -> list[str]:
        """Append atomically; returns the ids written (events at old positions are skipped).

        A PriceChange's position is its tick's (partition, offset). A SignalChange or a
        Breadth has none of its own: `sources` (aligned with `events`) can give one, a
        (name, offset) pair whose name must not be a tick partition number, e.g.
        ("signals.3", 17) or ("breadth", interval number); one without is always appended.
        `generations` (aligned with `events`) gives each PriceChange's tick partition
        generation (gen, start) as the driver read it (streams.codec.GENERATION_HEADER): a
        newer one lowers the fence to start - 1.
        """
        check_name(strategy, "strategy")
        if not events:
            return []
        if sources is not None and len(sources) != len(events):
            raise ValueError("sources must have one entry per event")
        if generations is not None and len(generations) != len(events):
            raise ValueError("generations must have one entry per event")
        fresh_epoch = secrets.token_hex(8)
        args: list[Any] = [*self._retention, fresh_epoch, CODEC_VERSION, self._group, self._ceiling]
        for i, event in enumerate(events):
            if isinstance(event, PriceChange) and event.strategy != strategy:
                raise ValueError(f"event for {event.strategy!r} appended to {strategy!r}")
            source = sources[i] if sources is not None else None
            if source is not None and source[0].isdigit():
                raise ValueError(f"source {source[0]!r} would share a tick partition's position")
            args.extend(_event_args(event, source, generations[i] if generations is not None else None))
        with translated(f"append events to {strategy}"):
            if self._wait_ms:
                reply = await self._append_and_wait(strategy, self._keys_for(strategy), args)
            else:
                reply = await self._script(keys=self._keys_for(strategy), args=args)
            if strategy not in self._registered or _text(reply[0]) == fresh_epoch:
                # the strategies set lives on another slot: outside the script; registered again
                # when the stream is new (a Redis that lost its data lost the set too)
                await self.client.sadd(self.keys.strategies(), strategy)
                self._registered.add(strategy)
                # series at 0 from the start, so an alert's increase() sees the first failover
                FAILOVER_REGRESSIONS.labels(strategy)
                FAILOVER_REUSED.labels(strategy)
                FAILOVER_LOST.labels(strategy)
                REPLICA_UNACKED.labels(strategy)
        held, lost, reused, regressed = int(reply[1]), int(reply[2]), int(reply[3]), _text(reply[4])
        ids = [_text(i) for i in reply[6:] if i is not None]
        if regressed:
            FAILOVER_REGRESSIONS.labels(strategy).inc()
            log.error("strategy stream found on a new server (failover): ids acknowledged after the last one "
                      "kept are lost", extra={"strategy": strategy, "last_kept_id": regressed,
                                              "next_id": ids[0] if ids else None})
        if self._failover_check:
            await self._count_lost(strategy, int(reply[5]))
            self._recent[strategy].extend(ids)
        if reused:
            FAILOVER_REUSED.labels(strategy).inc(reused)
            log.warning("tick positions handed out again by a ticks failover: the fence now takes the new ticks",
                        extra={"strategy": strategy, "events": reused})
        HELD_BYTES.labels(strategy).set(held)
        HOLD_CEILING.set(self._ceiling if self._group else 0)
        if lost:
            TRIMMED_UNARCHIVED.labels(strategy).inc(lost)
            self._log_loss(strategy, lost, held)
        return ids

    async def _append_and_wait(self, strategy: str, keys: list[str], args: list[Any]) -> Any:
        """The append script, then WAIT 1 <ms> on the same connection to the key's master.

        WAIT counts the replicas that have every write *of its connection*, so the two must share
        one: redis-py's cluster client picks a pooled connection per command (and keeps scripts
        out of its pipelines), but the node owning the slot sends a list of commands down one
        connection (ClusterNode.execute_pipeline, what its own pipelines use). NOSCRIPT loads the
        script there and tries once more; anything else unusual (MOVED or ASK after a failover, a
        lost connection) goes the ordinary way, with its retries, and is counted as not acknowledged."""
        client = cast(RedisCluster, self.client)
        try:
            await client.initialize()  # a no-op once the slot map is known
            node = client.get_node_from_key(keys[0])
        except rex.RedisClusterException:  # the slot map is being rebuilt (a failover): the ordinary path
            node = None
        for _attempt in range(2 if node is not None and self._script.sha else 0):
            assert node is not None
            cmds = [PipelineCommand(0, "EVALSHA", self._script.sha, len(keys), *keys, *args),
                    PipelineCommand(1, "WAIT", 1, self._wait_ms)]
            try:
                await node.execute_pipeline(cmds)
            except (rex.ConnectionError, rex.TimeoutError, AttributeError):
                break  # nothing known: the ordinary path (as redis-py's own retry would)
            if isinstance(cmds[0].result, rex.NoScriptError):
                with translated("load the append script"):
                    await node.execute_command("SCRIPT", "LOAD", _APPEND_LUA)
                continue
            if isinstance(cmds[0].result, Exception):
                break
            if isinstance(cmds[1].result, Exception) or int(cmds[1].result) < 1:
                REPLICA_UNACKED.labels(strategy).inc()
            return cmds[0].result
        REPLICA_UNACKED.labels(strategy).inc()
        return await self._script(keys=keys, args=args)

    async def _count_lost(self, strategy: str, failovers: int) -> None:
        """When the stream's failover records grew: count the ids this writer appended past each
        new record's last kept id (the old master acknowledged them; the new one never had them)."""
        seen = self._failovers_seen.get(strategy)
        self._failovers_seen[strategy] = failovers
        if seen is None or failovers <= seen:
            return  # the first append of this writer: what went before is not its own
        with translated(f"read failover records of {strategy}"):
            raw = cast(list[RawEntry], await self.client.xrevrange(self.keys.failovers(strategy),
                                                                   count=failovers - seen))
        recent = self._recent[strategy]
        for _rid, fields in raw:
            kept = {_text(k): _text(v) for k, v in fields.items()}["after"]
            gone = sum(1 for i in recent if parse_id(i) > parse_id(kept))
            FAILOVER_LOST.labels(strategy).inc(gone)
            log.error("events this writer appended were lost in a failover", extra={
                "strategy": strategy, "last_kept_id": kept, "lost": gone})
        recent.clear()

    def _log_loss(self, strategy: str, lost: int, held: int) -> None:
        # past the ceiling every append trims again: one line per strategy every LOSS_LOG_S
        self._unlogged[strategy] = self._unlogged.get(strategy, 0) + lost
        now = time.monotonic()
        if now - self._loss_logged.get(strategy, -LOSS_LOG_S) >= LOSS_LOG_S:
            log.error("events trimmed before they were archived: the hold ceiling was passed",
                      extra={"strategy": strategy, "lost": self._unlogged.pop(strategy),
                             "stream_bytes": held, "ceiling_bytes": self._ceiling})
            self._loss_logged[strategy] = now

    async def failover_holes(self, strategy: str, epoch: str) -> list[tuple[str, str | None]]:
        """(last id kept, first id appended after) of each failover of the stream in `epoch`:
        ids strictly between the two were acknowledged by a master that died and are gone."""
        if not self._failover_check:
            return []  # one server: no replica takes over, and no record is kept
        with translated(f"read failover records of {strategy}"):
            raw = cast(list[RawEntry], await self.client.xrange(self.keys.failovers(strategy)))
            out: list[tuple[str, str | None]] = []
            for _rid, fields in raw:
                f = {_text(k): _text(v) for k, v in fields.items()}
                if f.get("epoch") != epoch:
                    continue
                nxt = cast(list[RawEntry], await self.client.xrange(self.stream_key(strategy), min=f"({f['after']}",
                                                                    count=1))
                out.append((f["after"], _text(nxt[0][0]) if nxt else None))
        return out

    async def in_failover_hole(self, strategy: str, epoch: str, event_id: str) -> bool:
        """Whether `event_id` is one a failover lost (the stream no longer holds it)."""
        eid = parse_id(event_id)
        return any(parse_id(after) < eid and (nxt is None or eid < parse_id(nxt))
                   for after, nxt in await self.failover_holes(strategy, epoch))

    async def gap_records(self, strategy: str) -> list[Gap]:
        """The gaps the append script recorded and no archiver has moved to the archive yet."""
        with translated(f"read gap records of {strategy}"):
            raw = cast(list[RawEntry], await self.client.xrange(self.keys.gaps(strategy)))
        out = []
        for rid, fields in raw:
            f = {_text(k): _text(v) for k, v in fields.items()}
            out.append(Gap(strategy, f["epoch"], f["first"], f["last"], int(f["lost"]), "ceiling", _text(rid)))
        return out

    async def drop_gap_records(self, strategy: str, record_ids: Sequence[str]) -> None:
        """Delete gap records once the archive holds them."""
        if record_ids:
            with translated(f"drop gap records of {strategy}"):
                await self.client.xdel(self.keys.gaps(strategy), *record_ids)

    async def has_gap(self, strategy: str, epoch: str, after_id: str | None, until_id: str | None) -> bool:
        """Whether a gap record of `epoch` touches (after_id, until_id]."""
        return any(g.epoch == epoch and g.touches(after_id, until_id) for g in await self.gap_records(strategy))

    async def read_after(
        self,
        strategy: str,
        after_id: str | None,
        *,
        until_id: str | None = None,
        count: int | None = None,
    ) -> list[StoredEvent]:
        """Events with id > after_id (and <= until_id), oldest first; corrupt entries raise."""
        low = f"({after_id}" if after_id else "-"
        with translated(f"read events of {strategy}"):
            raw = await self.client.xrange(self.stream_key(strategy), min=low, max=until_id or "+", count=count)
        return [lazy(eid, fields) for eid, fields in cast(list[RawEntry], raw or [])]

    async def _edge_id(self, strategy: str, newest: bool) -> str | None:
        with translated(f"read events of {strategy}"):
            key = self.stream_key(strategy)
            raw = cast(list[RawEntry], await (
                self.client.xrevrange(key, count=1) if newest else self.client.xrange(key, count=1)
            ))
        return _text(raw[0][0]) if raw else None

    async def latest_id(self, strategy: str) -> str | None:
        """Id of the newest event, or None for an empty or unknown stream."""
        return await self._edge_id(strategy, newest=True)

    async def latest(self, strategy: str) -> StoredEvent | None:
        """The newest event (not yet decoded), or None for an empty or unknown stream."""
        with translated(f"read events of {strategy}"):
            raw = cast(list[RawEntry], await self.client.xrevrange(self.stream_key(strategy), count=1))
        return lazy(raw[0][0], raw[0][1]) if raw else None

    async def first_id(self, strategy: str) -> str | None:
        """Id of the oldest event Redis still keeps."""
        return await self._edge_id(strategy, newest=False)

    async def origin_id(self, strategy: str) -> str | None:
        """Id of the first event ever appended in the current epoch (trimmed or not)."""
        with translated(f"read positions of {strategy}"):
            raw = await self.client.hget(self.keys.positions(strategy), "@first")
        return _text(raw) if raw else None

    async def epoch(self, strategy: str) -> str | None:
        with translated(f"read epoch of {strategy}"):
            raw = await self.client.get(self.keys.epoch(strategy))
        return _text(raw) if raw else None

    async def snapshot(self, strategy: str) -> list[StoredEvent]:
        """The latest event of every stock in the strategy, ordered by event id."""
        with translated(f"read snapshot of {strategy}"):
            raw = cast(dict[bytes, bytes], await self.client.hgetall(self.keys.snapshot(strategy)))
        out = []
        for value in raw.values():
            eid, version, body = value.split(b"\n", 2)
            try:
                out.append(decode(eid, event_fields(b"price", version, body)))
            except CorruptEntry:
                continue  # an unreadable snapshot row is replaced by the stock's next event
        return sorted(out, key=lambda s: parse_id(s.id))

    async def strategies(self) -> list[str]:
        """Every strategy that has had an event appended."""
        with translated("read strategies"):
            raw = await self.client.smembers(self.keys.strategies())
        return sorted(_text(s) for s in raw)

    async def is_strategy(self, name: str) -> bool:
        """Whether `name` has had an event appended (one SISMEMBER; creates nothing)."""
        with translated("check a strategy"):
            return bool(await self.client.sismember(self.keys.strategies(), name))

    async def length(self, strategy: str) -> int:
        """Events Redis holds for the strategy now."""
        with translated(f"length of {strategy}"):
            return int(await self.client.xlen(self.stream_key(strategy)))

    async def ping(self) -> None:
        """Raises StreamUnavailable when Redis does not answer."""
        with translated("ping"):
            await self.client.ping()


__all__ = ["EventLog", "Gap", "RawEntry", "StoredEvent", "decode", "lazy", "parse_id"]
