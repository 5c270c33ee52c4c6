"""Topic partitions as Redis streams with dense offsets: the one writer of topic entries.

`RecordAppender` runs streams/append_records.lua by EVALSHA, one call per
partition, pipelined across partitions in one round trip (one partition after
another on Redis Cluster, where each is its own slot). Ingest writes through
`PartitionLog`, the faust driver's producer through the appender directly.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from importlib.resources import files
from typing import Any, NamedTuple, cast

from redis.asyncio.cluster import RedisCluster

from streams.codec import CODEC_VERSION, EncodedRecord, Record, decode_record, id_to_offset
from streams.connection import AnyRedis, execute
from streams.errors import ScriptMissing, StreamUnavailable, translate, translated
from streams.keys import Keys

APPEND_LUA = files("streams").joinpath("append_records.lua").read_text()

TopicPartition = tuple[str, int]


class Tail(NamedTuple):
    """A partition's end: the offset the next record gets, and the newest record kept."""

    next_offset: int
    last: Record | None


class RecordAppender:
    """Append encoded records (see `codec.encode_record`) to any topic partitions."""

    def __init__(self, client: AnyRedis, keys: Keys):
        self.client = client
        self.keys = keys
        self._sha: str | None = None
        # generations (one INFO per call, streams/append_records.lua) only where a replica can
        # take over: a single server's user does not pay for failover detection
        self._generations = isinstance(client, RedisCluster)

    def _call(
        self, tp: TopicPartition, maxlen: int, records: Sequence[EncodedRecord], expected: int | None = None,
        compact: bool = False,
    ) -> list[Any]:
        topic, partition = tp
        keys = [self.keys.topic_partition(topic, partition), self.keys.topic_sequence(topic, partition)]
        if self._generations:  # KEYS[3]: the script checks for a failover only when it is there
            keys.append(self.keys.topic_generation(topic, partition))
        if compact:  # the compaction hash goes last: the script finds it at KEYS[#KEYS]
            keys.append(self.keys.topic_compaction(topic, partition))
        args: list[Any] = [
            "EVALSHA", self._sha, len(keys), *keys,
            maxlen, CODEC_VERSION, "" if expected is None else int(expected), "compact" if compact else "",
        ]
        for rec in records:
            args.extend(rec)
        return args

    async def _load(self) -> None:
        with translated("load the append script"):
            self._sha = cast(str, await self.client.script_load(APPEND_LUA))

    async def append_many(
        self,
        batches: Mapping[TopicPartition, Sequence[EncodedRecord]],
        maxlen: Mapping[str, int] | None = None,
        expected: Mapping[TopicPartition, int] | None = None,
        compacting: Collection[str] = (),
    ) -> dict[TopicPartition, int]:
        """Append each partition's records in order; returns partition -> first offset written.

        `maxlen` caps a topic's partitions (MAXLEN ~). On the `compacting` topics a keyed
        record deletes the entry it supersedes (see append_records.lua). `expected` makes a partition's append
        conditional: it lands only if that partition's next offset is the one given, else
        OffsetConflict and nothing is written there; a conditional append redis-py retried
        after a lost reply conflicts with its own first landing, so it never lands twice (the
        caller re-reads the partition to learn which happened). A script Redis lost with a restart is loaded again and only
        the partitions it refused are retried (nothing was written there).
        Raises StreamUnavailable (retry the whole call: partitions not reported were not written,
        or were, at-least-once), OffsetConflict or CommandError.
        """
        todo = {tp: recs for tp, recs in batches.items() if recs}
        if self._sha is None and todo:
            await self._load()
        out: dict[TopicPartition, int] = {}
        for _attempt in range(2):
            calls = list(todo)
            caps = maxlen or {}
            wants = expected or {}
            results: list[Any]
            with translated("append records"):
                if isinstance(self.client, RedisCluster):
                    # redis-py refuses scripts in cluster pipelines, and concurrent first calls on
                    # a fresh cluster client were seen to run a script twice (its retry after an
                    # internal re-initialisation): one partition after another instead
                    results = []
                    for tp in calls:
                        try:
                            results.append(await self.client.execute_command(
                                *self._call(tp, caps.get(tp[0], 0), todo[tp], wants.get(tp), tp[0] in compacting)))
                        except Exception as exc:  # noqa: BLE001 - sorted out below, like a pipeline reply
                            results.append(exc)
                else:
                    pipe = self.client.pipeline(transaction=False)
                    for tp in calls:
                        pipe.execute_command(*self._call(tp, caps.get(tp[0], 0), todo[tp], wants.get(tp),
                                                         tp[0] in compacting))
                    try:
                        results = await pipe.execute(raise_on_error=False)
                    finally:
                        await pipe.reset()
            missing: dict[TopicPartition, Sequence[EncodedRecord]] = {}
            for tp, result in zip(calls, results):
                if isinstance(result, BaseException):
                    error = translate(result, f"append to {self.keys.topic_partition(*tp)}")
                    if isinstance(error, ScriptMissing):
                        missing[tp] = todo[tp]
                        continue
                    raise error
                out[tp] = int(result)
            if not missing:
                return out
            await self._load()
            todo = missing
        raise StreamUnavailable("append script kept disappearing from Redis")


class PartitionLog:
    """Append to one topic's partitions."""

    def __init__(
        self, client: AnyRedis, keys: Keys, topic: str, *, maxlen: int | None = None, compacting: bool = False,
    ):
        self.client = client
        self.keys = keys
        self.topic = topic
        self.maxlen = maxlen or 0
        self.compacting = compacting
        self._appender = RecordAppender(client, keys)

    def stream_key(self, partition: int) -> str:
        return self.keys.topic_partition(self.topic, partition)

    async def append(self, partition: int, records: Sequence[EncodedRecord], *, expected: int | None = None) -> int:
        """Append encoded records (see `encode_record`); returns the first offset written.
        With `expected`, only if the partition's next offset is that one (else OffsetConflict)."""
        if not records:
            raise ValueError("nothing to append")
        return (await self.append_many({partition: records},
                                        expected=None if expected is None else {partition: expected}))[partition]

    async def append_many(
        self, batches: Mapping[int, Sequence[EncodedRecord]], *, expected: Mapping[int, int] | None = None
    ) -> dict[int, int]:
        """One pipelined round trip for several partitions; returns partition -> first offset."""
        firsts = await self._appender.append_many(
            {(self.topic, p): recs for p, recs in batches.items()}, {self.topic: self.maxlen},
            {(self.topic, p): o for p, o in expected.items()} if expected else None,
            (self.topic,) if self.compacting else ())
        return {p: first for (_topic, p), first in firsts.items()}

    async def tails(self, partitions: int) -> dict[int, Tail]:
        """Each partition's next offset and newest entry, each partition read atomically
        (a MULTI on its own slot), so an append cannot fall between the two reads."""
        out: dict[int, Tail] = {}
        cluster = isinstance(self.client, RedisCluster)
        # one MULTI per partition on Cluster (a transaction cannot span slots), one for all otherwise
        groups = [[p] for p in range(partitions)] if cluster else [list(range(partitions))]
        for group in groups:
            pipe: Any = self.client.pipeline(transaction=True)
            for p in group:
                pipe.xrevrange(self.stream_key(p), count=1)
                pipe.get(self.keys.topic_sequence(self.topic, p))
            replies = await execute(pipe, f"read the tails of {self.topic}")
            for i, p in enumerate(group):
                last, seq = replies[2 * i], replies[2 * i + 1]
                if last:
                    entry_id, fields = last[0]
                    record: Record | None = decode_record(entry_id, fields)
                else:
                    record = None
                if seq is not None:
                    next_offset = int(seq)
                else:  # counter not written yet: the append script derives it the same way
                    next_offset = record.offset + 1 if record else 0
                out[p] = Tail(next_offset, record)
        return out


def queue_bounds(pipe: Any, keys: Keys, topic: str, partition: int) -> None:
    """Queue on `pipe` the three reads `read_bounds` needs for one partition."""
    key = keys.topic_partition(topic, partition)
    pipe.xrange(key, count=1)
    pipe.xrevrange(key, count=1)
    pipe.get(keys.topic_sequence(topic, partition))


def read_bounds(
    first: list[tuple[bytes, Any]], last: list[tuple[bytes, Any]], seq: bytes | None
) -> tuple[int, int]:
    """(earliest offset kept, next offset to be written) from the replies to `queue_bounds`:
    Kafka's low and high watermarks."""
    if seq is not None:
        high = int(seq)
    else:  # counter not written yet: derive it as the append script would
        high = id_to_offset(last[0][0]) + 1 if last else 0
    return (id_to_offset(first[0][0]) if first else high), high


__all__ = ["PartitionLog", "RecordAppender", "Tail", "queue_bounds", "read_bounds"]
