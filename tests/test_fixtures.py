"""The test fixtures themselves: real servers, and each test isolated from the others."""

import asyncpg
import pytest


@pytest.mark.parametrize("run", [1, 2])
async def test_each_test_gets_its_own_postgres_schema(pg_url, run):
    conn = await asyncpg.connect(pg_url)
    try:
        # the same table name in every run: would fail if the schema were shared
        await conn.execute("CREATE TABLE probe (n int)")
        await conn.execute("INSERT INTO probe VALUES ($1)", run)
        schema = await conn.fetchval("SELECT current_schema()")
        assert schema.startswith("t_")
        assert await conn.fetchval("SELECT count(*) FROM probe") == 1
    finally:
        await conn.close()


@pytest.mark.parametrize("run", [1, 2])
async def test_each_test_gets_its_own_key_prefix(redis, keys, run):
    key = keys.events("isolation")
    assert await redis.exists(key) == 0
    await redis.xadd(key, {b"run": str(run).encode()})
    assert await redis.xlen(key) == 1
