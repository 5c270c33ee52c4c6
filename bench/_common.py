"""Benchmark plumbing: real servers (env or embedded), isolated prefixes, timing helpers."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator

from streams.keys import Keys
from tickwave import servers


def redis_url() -> contextlib.AbstractContextManager[str]:
    return servers.url_or_embedded(os.environ.get("REDIS_URL"), servers.start_redis)


def database_url() -> contextlib.AbstractContextManager[str]:
    return servers.url_or_embedded(os.environ.get("DATABASE_URL"), servers.start_postgres)


@contextlib.asynccontextmanager
async def scratch_schema(database_url: str) -> AsyncIterator[str]:
    """A DSN into a fresh schema with the migrations applied, dropped afterwards."""
    import asyncpg

    from streams.pg import upgrade

    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in database_url else "?"
    dsn = f"{database_url}{sep}search_path={schema}"
    try:
        await upgrade(dsn)
        yield dsn
    finally:
        await admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await admin.close()


def fresh_keys() -> Keys:
    return Keys(prefix=f"twbench:{uuid.uuid4().hex[:8]}:")


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


async def drop_prefix(client, keys: Keys) -> None:  # type: ignore[no-untyped-def]
    found = [k async for k in client.scan_iter(match=f"{keys.prefix}*", count=1000)]
    for i in range(0, len(found), 500):
        await client.delete(*found[i:i + 500])


def line(name: str, value: float, unit: str, baseline: float | None = None, base_name: str = "baseline") -> str:
    text = f"{name:<44} {value:>12,.1f} {unit}"
    if baseline:
        text += f"   {base_name} {baseline:,.1f} {unit}   ratio {value / baseline:.2f}"
    return text
