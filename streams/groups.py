"""Consumer-group helpers: create idempotently, read, ack in batches, claim idle entries."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast

from redis.asyncio.cluster import RedisCluster

from streams.connection import AnyRedis, execute
from streams.errors import CommandError, GroupExists, translate, translated

Entry = tuple[bytes, dict[bytes, bytes]]


async def ensure_group(client: AnyRedis, key: str, group: str, start_id: str = "0", *, mkstream: bool = True) -> bool:
    """Create `group` on `key` (and the stream if missing, unless `mkstream` is False: then
    CommandError); True if it was created now."""
    try:
        with translated(f"create group {group} on {key}"):
            await client.xgroup_create(key, group, id=start_id, mkstream=mkstream)
        return True
    except GroupExists:
        return False


async def read_group(
    client: AnyRedis,
    group: str,
    consumer: str,
    streams: Mapping[str, str],
    *,
    count: int = 500,
    block_ms: int | None = None,
) -> list[tuple[str, list[Entry]]]:
    """XREADGROUP over several streams; `">"` for new entries, `"0"` for this consumer's pending.

    A pending entry that was deleted (trimmed) since it was delivered comes back with empty
    fields: acknowledge it, there is nothing left to read."""
    if isinstance(client, RedisCluster) and len(streams) > 1:
        by_slot: dict[int, dict[str, str]] = defaultdict(dict)
        for key, start in streams.items():
            by_slot[client.keyslot(key)][key] = start
        if len(by_slot) > 1:
            # a Cluster refuses one read across slots (CROSSSLOT): one read per slot, side by
            # side; with block_ms the call returns when every read has (at most block_ms)
            parts = await asyncio.gather(*(read_group(client, group, consumer, part, count=count, block_ms=block_ms)
                                           for part in by_slot.values()))
            return [got for part in parts for got in part]
    with translated(f"read group {group}"):
        reply = await client.xreadgroup(
            group, consumer, cast(Any, dict(streams)), count=count, block=block_ms
        )
    out: list[tuple[str, list[Entry]]] = []
    for key, entries in cast(list[tuple[Any, list[Any]]], reply or []):
        name = key.decode() if isinstance(key, bytes) else key
        # a pending entry deleted by trimming comes back with no fields (nil, or {} from redis-py)
        out.append((name, [(eid, fields or {}) for eid, fields in entries]))
    return out


async def ack(client: AnyRedis, group: str, acks: Iterable[tuple[str, bytes | str]]) -> int:
    """Acknowledge (key, id) pairs with one XACK per key in one pipeline; returns how many."""
    per_key: dict[str, list[bytes | str]] = defaultdict(list)
    for key, eid in acks:
        per_key[key].append(eid)
    if not per_key:
        return 0
    pipe = client.pipeline(transaction=False)
    for key, ids in per_key.items():
        pipe.xack(key, group, *ids)
    return sum(int(n) for n in await execute(pipe, f"ack group {group}"))


async def claim_idle(
    client: AnyRedis,
    key: str,
    group: str,
    consumer: str,
    *,
    min_idle_ms: int,
    count: int = 500,
) -> list[Entry]:
    """Take over entries pending longer than `min_idle_ms` (a dead consumer's), oldest first.

    Entries deleted since they were delivered come back with empty fields where Redis names
    them (7.0 lists them, and drops them from the pending list); 6.2 gives no id, moves them
    to `consumer`, and its next read of its own pending returns them with empty fields."""
    claimed: list[Entry] = []
    cursor: bytes | str = "0-0"
    with translated(f"claim idle on {key}"):
        while len(claimed) < count:
            reply = await client.xautoclaim(
                key, group, consumer, min_idle_time=min_idle_ms, start_id=cursor, count=count - len(claimed)
            )
            cursor, entries = reply[0], reply[1]
            claimed.extend((eid, fields) for eid, fields in entries if eid is not None)
            claimed.extend((eid, {}) for eid in (reply[2] if len(reply) > 2 else []))
            if cursor in (b"0-0", "0-0") or not entries:
                break
    return claimed


async def group_lag(client: AnyRedis, key: str, group: str) -> int | None:
    """Entries not yet delivered to `group` (Redis 7's lag), or None when Redis cannot tell."""
    try:
        with translated(f"group info {key}"):
            groups = await client.xinfo_groups(key)
    except CommandError:  # no such stream
        return None
    return _lag_of(groups, group)


async def group_lags(client: AnyRedis, keys: Sequence[str], group: str) -> dict[str, int | None]:
    """`group_lag` of many streams in one pipelined round trip."""
    if not keys:
        return {}
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.xinfo_groups(key)
    try:
        with translated(f"group info of {len(keys)} streams"):
            replies = await pipe.execute(raise_on_error=False)
    finally:
        await pipe.reset()
    out: dict[str, int | None] = {}
    for key, reply in zip(keys, replies):
        if isinstance(reply, BaseException):
            error = translate(reply, f"group info {key}")
            if not isinstance(error, CommandError):
                raise error
            out[key] = None  # no such stream
        else:
            out[key] = _lag_of(reply, group)
    return out


def _lag_of(infos: Iterable[dict[Any, Any]], group: str) -> int | None:
    for info in infos:
        name = info.get("name")
        if (name.decode() if isinstance(name, bytes) else name) == group:
            lag = info.get("lag")
            return int(lag) if lag is not None else None
    return None
