"""Redis clients from URLs: `redis://`, `rediss://` (TLS) and `redis+cluster://`."""

from __future__ import annotations

from typing import Any, TypeAlias

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.asyncio.cluster import RedisCluster

from streams.errors import StreamsError

AnyRedis: TypeAlias = "aioredis.Redis | RedisCluster"

try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is a declared dependency
    _hiredis_pack = None  # type: ignore[assignment]


class HiredisPackingConnection(aioredis.Connection):
    """redis-py's asyncio connection packs commands in Python (its sync one uses hiredis);
    packing large pipelines and script calls was a third of ingest's time."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if _hiredis_pack is None or isinstance(args[0], str) and " " in args[0]:
            return super().pack_command(*args)
        return [_hiredis_pack(args)]

CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
_STREAM_READS = ("XREAD", "XREADGROUP")


class _RedisCluster(RedisCluster):
    """redis-py's cluster client finds the keys of XREAD and XREADGROUP (movable keys) by asking
    one fixed node (COMMAND GETKEYS); once that node died in a failover, every later read failed
    with AttributeError (redis-py 8.1: "NoneType object has no attribute writelines"), which
    crashed faust's fetcher. Their keys follow STREAMS: taken from the arguments here."""

    async def _determine_slot(self, command: str, *args: Any) -> int:
        if command.upper() in _STREAM_READS:
            words = [a.upper() if isinstance(a, str) else a for a in args]
            for marker in ("STREAMS", b"STREAMS"):
                if marker in words:
                    at = words.index(marker) + 1
                    keys = args[at:at + (len(args) - at) // 2]
                    slots = {self.keyslot(k) for k in keys}  # type: ignore[arg-type]
                    if len(slots) == 1:
                        return slots.pop()
        return await super()._determine_slot(command, *args)  # type: ignore[no-any-return]

    async def _execute_command(self, target_node: Any, *args: Any, **kwargs: Any) -> Any:
        # redis-py 8.1: when a master dies, one task's reconnect can race another's disconnect of
        # the same node's connections, and the command fails with AttributeError ("'NoneType'
        # object has no attribute 'writelines'": the writer went away under it). Seen killing
        # faust's fetcher in tests/test_failover.py. It is a lost connection: raised as one, the
        # client re-reads the slot map and retries like after any connection error.
        try:
            return await super()._execute_command(target_node, *args, **kwargs)
        except AttributeError as exc:
            if "NoneType" not in str(exc):
                raise
            self._initialize = True
            raise rex.ConnectionError(f"connection to {target_node.name} closed under a command: {exc}") from exc


def connect(url: str, *, pool_size: int | None = None, pool_timeout: float = 5.0, **options: Any) -> AnyRedis:
    """A binary-safe asyncio client; cluster URLs give a RedisCluster. With `pool_size`, a
    standalone client holds at most that many connections and a command waits up to
    `pool_timeout` seconds for a free one (then StreamUnavailable); RedisCluster keeps
    redis-py's own pool per cluster node."""
    options.setdefault("decode_responses", False)
    options.setdefault("health_check_interval", 15)
    try:
        for scheme in CLUSTER_SCHEMES:
            if url.startswith(scheme):
                plain = ("rediss://" if scheme.startswith("rediss") else "redis://") + url[len(scheme):]
                options.pop("health_check_interval", None)
                return _RedisCluster.from_url(plain, **options)
        if _hiredis_pack is not None and url.startswith("redis://"):
            options.setdefault("connection_class", HiredisPackingConnection)
        # a pooled connection that died with a Redis restart fails on its next use: reconnect
        # and retry twice before the caller sees StreamUnavailable (appends are idempotent by
        # position, or at-least-once for topic partitions)
        options.setdefault("retry", Retry(ExponentialBackoff(cap=0.5, base=0.05), 2))
        options.setdefault("retry_on_error", [rex.ConnectionError, rex.TimeoutError])
        if pool_size is not None:
            pool = aioredis.BlockingConnectionPool.from_url(
                url, max_connections=pool_size, timeout=pool_timeout, **options)
            return aioredis.Redis.from_pool(pool)
        return aioredis.Redis.from_url(url, **options)
    except ValueError as exc:
        raise StreamsError(f"bad Redis URL {url!r}: {exc}") from None


def dedicated(url: str, **options: Any) -> AnyRedis:
    """A client on one connection of its own, for a blocking read that must not hold a pooled
    connection. It never reconnects and retries silently: a reconnect changes the connection's
    CLIENT ID, which whoever unblocks the read must learn (from the error it sees). A cluster
    URL gives a RedisCluster of its own (its connections are per cluster node)."""
    if url.startswith(CLUSTER_SCHEMES):
        return connect(url, **options)
    options.setdefault("retry", Retry(NoBackoff(), 0))
    options.setdefault("health_check_interval", 0)
    return connect(url, single_connection_client=True, **options)


def is_cluster(client: AnyRedis) -> bool:
    return isinstance(client, RedisCluster)


async def execute(pipe: Any, action: str) -> list[Any]:
    """Run a pipeline; Redis errors translated, and its connection released even when it fails
    (a pipeline that raised keeps its connection until reset, and warns when collected)."""
    from streams.errors import translated

    try:
        with translated(action):
            return list(await pipe.execute())
    finally:
        await pipe.reset()


async def server_version(client: AnyRedis) -> tuple[int, ...]:
    """The server's version as a tuple, e.g. (7, 0, 15)."""
    info = await client.info("server")
    if isinstance(client, RedisCluster):  # one dict per node
        info = next(iter(info.values())) if info and isinstance(next(iter(info.values())), dict) else info
    raw = info.get("redis_version", "0")
    raw = raw.decode() if isinstance(raw, bytes) else str(raw)
    return tuple(int(p) for p in raw.split(".") if p.isdigit())
