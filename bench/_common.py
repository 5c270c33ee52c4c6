"""Benchmark plumbing: real servers (env or embedded), isolated prefixes, timing helpers."""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

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
    """One figure, and its same-run baseline and ratio when there is one: read by people and by
    `parse_figures` (three spaces part the figure, the baseline and the ratio)."""
    text = f"{name:<44} {value:>12,.1f} {unit}"
    if baseline:
        text += f"   {base_name} {baseline:,.1f} {unit}   ratio {value / baseline:.2f}"
    return text


_NUMBER = r"-?[\d,]+\.\d"
_FIGURE = re.compile(
    rf"^(?P<name>\S.*?) +(?P<value>{_NUMBER}) (?P<unit>\S+(?: \S+)*?)"
    rf"(?:   (?P<base_name>\S.*?) (?P<baseline>{_NUMBER}) (?P=unit)   ratio (?P<ratio>\d+\.\d\d))?$"
)


@dataclass(frozen=True)
class Figure:
    """One printed figure, with its same-run baseline and ratio when the line has them."""

    name: str
    value: float
    unit: str
    base_name: str | None = None
    baseline: float | None = None
    ratio: float | None = None


def _number(text: str | None) -> float | None:
    return None if text is None else float(text.replace(",", ""))


def parse_figures(output: str) -> list[Figure]:
    """The figure lines `line` printed in a benchmark's output, in order."""
    found = []
    for row in output.splitlines():
        if m := _FIGURE.match(row):
            found.append(Figure(m["name"], float(m["value"].replace(",", "")), m["unit"], m["base_name"],
                                _number(m["baseline"]), _number(m["ratio"])))
    return found
