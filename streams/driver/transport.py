"""The faust Transport for Redis Streams, and its URL options.

`broker="redis://host:6379/0?prefix=tw:&session_timeout=6"` (also `rediss://`
for TLS and `redis+cluster://` / `rediss+cluster://` for Redis Cluster). The
query parameters below belong to the driver; any other is handed to redis-py
(`password=`, `ssl_cert_reqs=`, ...). Bad options fail when the app is built,
naming the parameter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import urlencode

from faust.exceptions import ImproperlyConfigured
from faust.transport import base
from faust.types import TP, AppT
from mode.utils.times import want_seconds
from yarl import URL

from streams.connection import AnyRedis, connect
from streams.driver.conductor import Conductor
from streams.driver.consumer import Consumer
from streams.driver.producer import Producer
from streams.driver.topics import Topics
from streams.driver.logs import ERROR, WARNING, note
from streams.errors import BadKey, StreamsError, StreamUnavailable, translated
from streams.keys import DEFAULT_PREFIX, Keys, check_name, check_topic
from streams.partition import partition_for
from streams.topics import TopicSettings


SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster")


@dataclass(frozen=True, slots=True)
class DriverOptions:
    """The driver's own URL query parameters."""

    redis_url: str
    #: key prefix shared with every other writer of the same topics (tickwave's ingest uses tw:)
    prefix: str = DEFAULT_PREFIX
    #: seconds without a heartbeat before a member's partitions move to the others
    session_timeout: float = 6.0
    #: seconds between heartbeats (and the longest a member sleeps between group checks)
    heartbeat_interval: float = 1.0
    #: longest a fetch blocks waiting for new entries, in seconds
    fetch_block: float = 0.5
    #: entries read per partition per fetch
    max_poll_records: int = 1000
    #: seconds the producer waits after a first record for more to share its round trip
    linger: float = 0.002
    #: seconds between retention trims of the topics this process writes
    trim_interval: float = 60.0
    #: seconds a stopping producer waits for Redis to take what it holds
    stop_flush_timeout: float = 30.0
    #: seconds start-up waits for Redis to answer before it gives up
    connect_timeout: float = 30.0

    @classmethod
    def from_urls(cls, urls: list[URL], *, max_poll_records: int | None = None) -> DriverOptions:
        if not urls:
            raise ImproperlyConfigured("the Redis Streams driver needs a broker URL")
        url = URL(str(urls[0]))
        if url.scheme not in SCHEMES:
            raise ImproperlyConfigured(f"broker URL {url} has scheme {url.scheme!r}; expected one of {SCHEMES}")
        query = dict(url.query)
        values: dict[str, Any] = {}
        if max_poll_records:
            values["max_poll_records"] = max_poll_records
        for name, kind in (("linger", float), ("session_timeout", float), ("heartbeat_interval", float), ("fetch_block", float),
                           ("max_poll_records", int), ("trim_interval", float), ("stop_flush_timeout", float),
                           ("connect_timeout", float)):
            if name in query:
                raw = query.pop(name)
                try:
                    values[name] = kind(raw)
                except ValueError:
                    raise ImproperlyConfigured(f"broker URL parameter {name}={raw!r} is not a number") from None
                if values[name] < 0 or (values[name] == 0 and name != "linger"):
                    raise ImproperlyConfigured(f"broker URL parameter {name}={raw!r} must be positive")
        if "prefix" in query:
            values["prefix"] = query.pop("prefix")
            if "{" in values["prefix"] or "}" in values["prefix"]:
                raise ImproperlyConfigured(f"broker URL parameter prefix={values['prefix']!r} must not hold braces")
        redis_url = str(url.with_query(None))
        if query:
            redis_url += "?" + urlencode(query)
        options = cls(redis_url=redis_url, **values)
        if options.heartbeat_interval * 2 > options.session_timeout:
            raise ImproperlyConfigured(
                f"broker URL parameter heartbeat_interval={options.heartbeat_interval} must be at most half "
                f"of session_timeout={options.session_timeout}, or one late heartbeat loses the partitions")
        return options


class Transport(base.Transport):
    """faust's transport on Redis Streams: topic-partition streams with dense offsets."""

    Conductor: ClassVar[type[Conductor]] = Conductor  # type: ignore[assignment,misc]
    Consumer: ClassVar[type[Consumer]] = Consumer  # type: ignore[assignment,misc]
    Producer: ClassVar[type[Producer]] = Producer  # type: ignore[assignment,misc]
    driver_version = "tickwave-redis-streams 1"

    def __init__(self, url: list[URL], app: AppT, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(url, app, loop=loop)
        if app.conf.processing_guarantee.value == "exactly_once":
            raise ImproperlyConfigured(
                "processing_guarantee='exactly_once' needs Kafka transactions; the Redis Streams driver is "
                "at-least-once (make your outputs idempotent, as tickwave's append_events is)")
        try:
            check_name(app.conf.id, "app id (the consumer group)")
        except BadKey as exc:
            raise ImproperlyConfigured(str(exc)) from None
        self.options = DriverOptions.from_urls(url, max_poll_records=app.conf.broker_max_poll_records)
        self.keys = Keys(self.options.prefix)
        self._redis: AnyRedis | None = None
        self._topics: Topics | None = None
        self._users = 0
        self._reply_starts: dict[int, int] | None = None

    async def acquire(self) -> None:
        """A service (consumer, producer) starts using the client: check Redis answers."""
        self._users += 1
        await self.check_connection()
        if self._reply_starts is None:
            # before this process sends anything, so before any request it sends: see client_start
            try:
                self._reply_starts = await self.topics.ends(self.app.conf.reply_to)
            except BadKey:
                self._reply_starts = {}  # the subscription refuses the name, with the reason

    def client_start(self, tp: TP) -> int | None:
        """Where a client-only app (faust's start_client: a CLI command, a script, a web process
        asking agents) starts reading a partition; None for its end.

        The app's reply topic is read from where it ended when this process first used Redis:
        faust sends a request before it subscribes to the reply topic (agent.ask, join, map),
        and a reply written before the subscription must not be skipped. Replies to other
        processes met on a shared reply topic are ignored by faust (unknown correlation ids)."""
        if self._reply_starts is None or tp.topic != self.app.conf.reply_to:
            return None
        return self._reply_starts.get(tp.partition, 0)  # a partition that did not exist then: all of it

    async def release(self) -> None:
        """A service stopped; the last one closes the client."""
        self._users -= 1
        if self._users <= 0 and self._redis is not None:
            client, self._redis, self._topics = self._redis, None, None
            await client.aclose()

    @property
    def redis(self) -> AnyRedis:
        """This transport's client (a pool: blocking reads and commands use their own connections)."""
        if self._redis is None:
            try:
                self._redis = connect(self.options.redis_url)
            except StreamsError as exc:
                raise ImproperlyConfigured(str(exc)) from None
        return self._redis

    @property
    def topics(self) -> Topics:
        if self._topics is None:
            self._topics = Topics(self.redis, self.keys, default_partitions=self.app.conf.topic_partitions)
        return self._topics

    async def check_connection(self) -> None:
        """Wait for Redis to answer, up to `connect_timeout`; then fail naming the URL."""
        deadline = asyncio.get_running_loop().time() + self.options.connect_timeout
        delay = 0.1
        while True:
            try:
                with translated("ping"):
                    await self.redis.ping()
                return
            except StreamUnavailable as exc:
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise StreamUnavailable(
                        f"Redis at {self.options.redis_url} did not answer within "
                        f"{self.options.connect_timeout:g} s: {exc}") from None
                note(WARNING, "waiting for redis", url=self.options.redis_url, error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def check_topics(self, topics: Iterable[str]) -> None:
        """Refuse a topic name the driver cannot use by crashing the app with the reason, so a
        worker stops at start-up (its subscription, its streams' topics) instead of one stream
        failing while the rest runs on."""
        for topic in topics:
            try:
                check_topic(topic)
            except BadKey as exc:
                error = ImproperlyConfigured(f"{exc} (the Redis Streams driver takes Kafka's topic names)")
                note(ERROR, "topic name refused", reason=str(exc))
                await self.app.crash(error)
                raise error from None

    async def create_topic(
        self, topic: str, partitions: int, *, config: Mapping[str, Any] | None = None,
        retention: Any = None, compacting: bool | None = None,
    ) -> TopicSettings:
        """Declare a topic. Retention comes from `retention` (seconds) or config `retention.ms`,
        a length cap from config `redis.maxlen`. A compacting topic (a table's changelog) keeps
        one entry per key (the append script deletes the entry a record supersedes) and is
        never trimmed: trimming would lose the latest value of keys not updated lately."""
        config = dict(config or {})
        retention_ms = int(config.get("retention.ms") or (want_seconds(retention) * 1000 if retention else 0))
        maxlen = int(config.get("redis.maxlen", 0))
        if compacting:
            retention_ms = maxlen = 0
        await self.check_topics([topic])
        return await self.topics.create(topic, partitions, retention_ms=retention_ms, maxlen=maxlen,
                                        compacting=compacting)

    def producer_partition(self, topic: str, key: bytes) -> int:
        """The shared murmur2 partitioner, with the topic's stored partition count."""
        settings = self.topics.cached(topic)
        return partition_for(key, settings.partitions if settings else self.topics.default_partitions)
