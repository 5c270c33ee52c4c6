"""History of a strategy after a given (epoch, id): the read model over the event log.
The archive serves what Redis no longer holds, Redis the rest, as one ordered sequence
with no gap and no duplicate. The archive is anything with `Archive`'s three reads
(streams.archive.ArchiveStore on PostgreSQL). A range that touches a recorded gap (events
trimmed before they were archived) is answered `covered: false, reason: gap`; an id a failover
lost (between the last id a promoted replica kept and the next one appended) `reason: failover`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from streams.codec import StoredEvent, parse_id
from streams.events import EventLog


class Archive(Protocol):
    """What history needs of the cold tier: ordered reads by event id within an epoch, and
    whether a recorded gap touches a range."""

    async def last_id(self, strategy: str, epoch: str) -> str | None: ...

    async def has_gap(self, strategy: str, epoch: str, after_id: str | None, until_id: str | None) -> bool: ...

    async def read_after(
        self, strategy: str, epoch: str, after_id: str | None, *,
        until_id: str | None = None, before_id: str | None = None, limit: int,
    ) -> list[StoredEvent]: ...


class Reason:
    UNKNOWN_STRATEGY = "unknown_strategy"
    EPOCH_CHANGED = "epoch_changed"
    NO_ARCHIVE = "no_archive"
    GAP = "gap"
    FAILOVER = "failover"


@dataclass(frozen=True)
class History:
    events: list[StoredEvent]
    covered: bool
    reason: str | None
    epoch: str | None
    truncated: bool = False  # more events exist after the last one returned


def _after(a: str, b: str) -> bool:
    return parse_id(a) > parse_id(b)


async def history(
    log: EventLog,
    store: Archive | None,
    strategy: str,
    *,
    epoch: str | None,
    after_id: str | None,
    until_id: str | None = None,
    limit: int,
) -> History:
    """Events with after_id < id <= until_id, at most `limit`; `covered` False rather than a hole."""
    for _ in range(3):
        result = await _history_once(log, store, strategy, epoch, after_id, until_id, limit)
        if result is not None:
            return result
    # Redis trimmed past our read position three times running: say so, never return a hole
    return History([], False, Reason.GAP, await log.epoch(strategy))


async def _history_once(
    log: EventLog,
    store: Archive | None,
    strategy: str,
    epoch: str | None,
    after_id: str | None,
    until_id: str | None,
    limit: int,
) -> History | None:
    current = await log.epoch(strategy)
    if current is None:
        return History([], False, Reason.UNKNOWN_STRATEGY, None)
    if epoch is not None and epoch != current:
        return History([], False, Reason.EPOCH_CHANGED, current)
    if after_id is not None and await log.in_failover_hole(strategy, current, after_id):
        # the caller holds an id a failover lost: what it saw after the last kept id may have
        # been appended again under new ids, so no replay can be both whole and free of repeats
        return History([], False, Reason.FAILOVER, current)

    first_kept = await log.first_id(strategy)
    origin = await log.origin_id(strategy)
    trimmed = first_kept is not None and origin is not None and first_kept != origin
    # Redis alone covers the request when nothing was ever trimmed, or when after_id is
    # at or past the oldest kept event; otherwise events right after after_id may be trimmed
    redis_covers = not trimmed or (
        after_id is not None and first_kept is not None and not _after(first_kept, after_id)
    )

    events: list[StoredEvent] = []
    if not redis_covers:
        if store is None:
            return History([], False, Reason.NO_ARCHIVE, current)
        assert first_kept is not None
        # the archive is written in stream order, so once it holds first_kept (or later) it
        # holds every event before it: that overlap is the proof there is no hole
        archived_last = await store.last_id(strategy, current)
        if archived_last is None or _after(first_kept, archived_last):
            return History([], False, Reason.GAP, current)
        # the gap records Redis still holds first, then the archive's: an archiver moves a
        # record into the archive before it deletes it from Redis, so one of the two has it
        if (await log.has_gap(strategy, current, after_id, until_id)
                or await store.has_gap(strategy, current, after_id, until_id)):
            return History([], False, Reason.GAP, current)
        # only what Redis no longer has; Redis serves the rest (no duplicate at the seam)
        events = await store.read_after(
            strategy, current, after_id, until_id=until_id, before_id=first_kept, limit=limit + 1
        )
        if len(events) > limit:
            return History(events[:limit], True, None, current, truncated=True)
        after_id = events[-1].id if events else after_id
        if until_id is not None and after_id is not None and not _after(until_id, after_id):
            return History(events, True, None, current)

    remaining = limit - len(events)
    tail = await log.read_after(strategy, after_id, until_id=until_id, count=remaining + 1)
    now_first = await log.first_id(strategy)
    if now_first != first_kept and now_first is not None and (after_id is None or _after(now_first, after_id)):
        # trimming ran between our checks and the read and passed our read position:
        # events may have vanished unseen in between, so start again
        return None
    if events and tail and not _after(tail[0].id, events[-1].id):
        tail = [e for e in tail if _after(e.id, events[-1].id)]
    truncated = len(tail) > remaining
    return History(events + tail[:remaining], True, None, current, truncated=truncated)
