"""Benchmark plumbing: real servers (env or embedded), isolated prefixes, timing helpers."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator

from streams.keys import Keys
from tickwave import servers


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = servers.start_redis()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.contextmanager
def database_url() -> Iterator[str]:
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    server = servers.start_postgres()
    try:
        yield server.url
    finally:
        server.stop()


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
