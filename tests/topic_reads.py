"""Reads of topic partitions that only tests need (the driver's consumer is the runtime reader)."""

from __future__ import annotations

from typing import Any, cast

from streams.codec import Record, decode_record, offset_to_id
from streams.connection import AnyRedis, execute
from streams.errors import CorruptEntry
from streams.keys import Keys
from streams.log import queue_bounds, read_bounds

RawEntry = tuple[bytes, dict[bytes, bytes]]


async def read_entries(client: AnyRedis, keys: Keys, topic: str, partition: int,
                       from_offset: int = 0, count: int = 1000) -> list[RawEntry]:
    """Raw entries at offsets >= from_offset, oldest first."""
    key = keys.topic_partition(topic, partition)
    return cast(list[RawEntry], list(await client.xrange(key, min=offset_to_id(max(from_offset, 0)), count=count) or []))


async def read_records(client: AnyRedis, keys: Keys, topic: str, partition: int, from_offset: int = 0,
                       count: int = 1000) -> tuple[list[Record], list[tuple[RawEntry, CorruptEntry]]]:
    """Decoded records, plus the entries that failed to decode."""
    good: list[Record] = []
    bad: list[tuple[RawEntry, CorruptEntry]] = []
    for entry in await read_entries(client, keys, topic, partition, from_offset, count):
        try:
            good.append(decode_record(*entry))
        except CorruptEntry as exc:
            bad.append((entry, exc))
    return good, bad


async def bounds(client: AnyRedis, keys: Keys, topic: str, partition: int) -> tuple[int, int]:
    """(earliest offset kept, next offset to be written) of one partition."""
    pipe: Any = client.pipeline(transaction=False)
    queue_bounds(pipe, keys, topic, partition)
    return read_bounds(*await execute(pipe, "bounds"))


async def append_timed(client: AnyRedis, key: str, entries: list[dict[bytes, bytes]]) -> list[bytes]:
    """Plain XADDs with Redis time ids (for group tests on arbitrary streams)."""
    return [cast(bytes, await client.xadd(key, cast(Any, e))) for e in entries]
