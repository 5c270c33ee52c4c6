"""A topic's settings in Redis: `<prefix>tmeta:{topic}` (partitions, retention_ms, maxlen,
compacting), set by the first declaration and never changed, and the `<prefix>topics` set of names.
Ingest and the faust driver both declare through `declare`, so every writer agrees."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from streams.connection import AnyRedis, execute
from streams.errors import StreamsError, translated
from streams.keys import Keys


@dataclass(frozen=True, slots=True)
class TopicSettings:
    partitions: int
    retention_ms: int = 0  # 0: kept until trimmed by length, or forever
    maxlen: int = 0  # 0: no length cap; else MAXLEN ~ on every append
    compacting: bool = False  # one entry per record key: each append deletes the entry it supersedes


async def declare(
    client: AnyRedis, keys: Keys, topics: Sequence[str], *, partitions: int,
    retention_ms: int = 0, maxlen: int = 0, compacting: bool | None = None,
) -> dict[str, TopicSettings]:
    """Settings of each topic, creating the missing ones with these (first writer wins,
    like Kafka's auto-create): one pipelined round trip for all of them.

    `compacting` is set by the first declaration that says (True or False), even on a topic
    an earlier declaration created without saying: a consumer's subscription or a producer's
    first send may declare a table's changelog before the table declares it compacting."""
    if not topics:
        return {}
    pipe = client.pipeline(transaction=False)
    for topic in topics:
        meta = keys.topic_meta(topic)
        pipe.hsetnx(meta, "partitions", partitions)
        if retention_ms:
            pipe.hsetnx(meta, "retention_ms", retention_ms)
        if maxlen:
            pipe.hsetnx(meta, "maxlen", maxlen)
        if compacting is not None:
            pipe.hsetnx(meta, "compacting", int(compacting))
        pipe.hgetall(meta)
        pipe.sadd(keys.topics(), topic)
    replies = await execute(pipe, "declare topics")
    step = 3 + bool(retention_ms) + bool(maxlen) + (compacting is not None)
    return {topic: _parse(topic, replies[i * step + step - 2]) for i, topic in enumerate(topics)}


async def stored(client: AnyRedis, keys: Keys, topic: str) -> TopicSettings | None:
    """Settings of a topic already declared, without declaring it; None when there is none."""
    with translated(f"settings of topic {topic}"):
        meta = cast(dict[bytes, bytes], await client.hgetall(keys.topic_meta(topic)))
    return _parse(topic, meta) if meta else None


def _parse(topic: str, meta: Mapping[bytes, bytes]) -> TopicSettings:
    try:
        settings = TopicSettings(
            partitions=int(meta[b"partitions"]),
            retention_ms=int(meta.get(b"retention_ms", 0)),
            maxlen=int(meta.get(b"maxlen", 0)),
            compacting=meta.get(b"compacting") == b"1",
        )
    except (KeyError, ValueError) as exc:
        raise StreamsError(f"topic {topic!r} has unreadable settings in Redis: {exc}") from None
    if settings.partitions < 1:
        raise StreamsError(f"topic {topic!r} has {settings.partitions} partitions in Redis")
    return settings
