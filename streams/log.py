"""Topic partitions as Redis streams with dense offsets: pipelined append and range reads."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from importlib.resources import files
from typing import Any, cast

from streams.codec import (
    CODEC_VERSION,
    EncodedRecord,
    Record,
    decode_record,
    encode_record,
    id_to_offset,
    offset_to_id,
)
from redis.asyncio.cluster import RedisCluster

from streams.connection import AnyRedis, execute
from streams.errors import CorruptEntry, translated
from streams.keys import Keys

_APPEND_LUA = files("streams").joinpath("append_records.lua").read_text()

RawEntry = tuple[bytes, dict[bytes, bytes]]


class PartitionLog:
    """Append and read one topic's partitions; the only writer of topic entries."""

    def __init__(self, client: AnyRedis, keys: Keys, topic: str, *, maxlen: int | None = None):
        self.client = client
        self.keys = keys
        self.topic = topic
        self.maxlen = maxlen or 0
        self._script = client.register_script(_APPEND_LUA)

    def stream_key(self, partition: int) -> str:
        return self.keys.topic_partition(self.topic, partition)

    def _args(self, records: Iterable[EncodedRecord]) -> list[Any]:
        args: list[Any] = [self.maxlen, CODEC_VERSION]
        for rec in records:
            args.extend(rec)
        return args

    async def append(
        self, partition: int, records: Sequence[EncodedRecord]
    ) -> int:
        """Append encoded records (see `encode_record`); returns the first offset written."""
        if not records:
            raise ValueError("nothing to append")
        keys = [self.stream_key(partition), self.keys.topic_sequence(self.topic, partition)]
        with translated(f"append to {keys[0]}"):
            return int(await self._script(keys=keys, args=self._args(records)))

    async def append_many(
        self, batches: Mapping[int, Sequence[EncodedRecord]]
    ) -> dict[int, int]:
        """One pipelined round trip for several partitions; returns partition -> first offset."""
        parts = [p for p, recs in batches.items() if recs]
        if not parts:
            return {}
        if isinstance(self.client, RedisCluster):
            # redis-py refuses scripts in cluster pipelines, and concurrent first calls on a
            # fresh cluster client were seen to run a script twice (its retry after an
            # internal re-initialisation): one partition after another instead
            return {p: await self.append(p, batches[p]) for p in parts}
        pipe = self.client.pipeline(transaction=False)
        for p in parts:
            keys = [self.stream_key(p), self.keys.topic_sequence(self.topic, p)]
            await self._script(keys=keys, args=self._args(batches[p]), client=cast(Any, pipe))
        results = await execute(pipe, f"append to topic {self.topic}")
        return {p: int(r) for p, r in zip(parts, results)}

    async def read(self, partition: int, from_offset: int, count: int = 1000) -> list[RawEntry]:
        """Raw entries at offsets >= from_offset, oldest first."""
        with translated(f"read {self.stream_key(partition)}"):
            return cast(list[RawEntry], list(
                await self.client.xrange(
                    self.stream_key(partition), min=offset_to_id(max(from_offset, 0)), count=count
                ) or []
            ))

    async def read_records(
        self, partition: int, from_offset: int, count: int = 1000
    ) -> tuple[list[Record], list[tuple[RawEntry, CorruptEntry]]]:
        """Decoded records, plus the entries that failed to decode (for the dead-letter stream)."""
        good: list[Record] = []
        bad: list[tuple[RawEntry, CorruptEntry]] = []
        for entry in await self.read(partition, from_offset, count):
            try:
                good.append(decode_record(*entry))
            except CorruptEntry as exc:
                bad.append((entry, exc))
        return good, bad

    async def bounds(self, partition: int) -> tuple[int, int]:
        """(earliest offset still kept, next offset to be written): Kafka's low/high watermarks."""
        pipe = self.client.pipeline(transaction=False)
        queue_bounds(pipe, self.keys, self.topic, partition)
        return read_bounds(*await execute(pipe, f"bounds of {self.stream_key(partition)}"))


def queue_bounds(pipe: Any, keys: Keys, topic: str, partition: int) -> None:
    """Queue on `pipe` the three reads `read_bounds` needs for one partition."""
    key = keys.topic_partition(topic, partition)
    pipe.xrange(key, count=1)
    pipe.xrevrange(key, count=1)
    pipe.get(keys.topic_sequence(topic, partition))


def read_bounds(first: list[RawEntry], last: list[RawEntry], seq: bytes | None) -> tuple[int, int]:
    """(earliest, next offset) from the replies to `queue_bounds`."""
    if seq is not None:
        high = int(seq)
    else:  # counter not written yet: derive it as the append script would
        high = id_to_offset(last[0][0]) + 1 if last else 0
    return (id_to_offset(first[0][0]) if first else high), high


async def append_timed(
    client: AnyRedis,
    key: str,
    entries: Sequence[Mapping[bytes, bytes]],
    *,
    maxlen: int | None = None,
    min_id: str | None = None,
) -> list[bytes]:
    """Pipelined XADD with Redis time ids and approximate retention (MAXLEN ~ or MINID ~)."""
    pipe = client.pipeline(transaction=False)
    for i, fields in enumerate(entries):
        last = i == len(entries) - 1
        pipe.xadd(
            key,
            dict(fields),  # type: ignore[arg-type]
            maxlen=maxlen if last else None,
            minid=min_id if last and maxlen is None else None,
            approximate=True,
        )
    return await execute(pipe, f"append to {key}") if entries else []


async def read_after(
    client: AnyRedis,
    key: str,
    after_id: str | None = None,
    *,
    until_id: str | None = None,
    count: int | None = None,
) -> list[RawEntry]:
    """Entries with id > after_id (exclusive) and <= until_id, oldest first."""
    low = f"({after_id}" if after_id else "-"
    with translated(f"range {key}"):
        return cast(list[RawEntry], list(await client.xrange(key, min=low, max=until_id or "+", count=count) or []))

__all__ = ["PartitionLog", "RawEntry", "append_timed", "encode_record", "queue_bounds", "read_after", "read_bounds"]
