"""Benchmark plumbing: real servers (env or embedded), isolated prefixes, timing helpers."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from streams.connection import AnyRedis
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


# --- CPU accounting -------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, every core and process."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


async def redis_cpu(client: AnyRedis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class CpuMeter:
    """CPU time of named processes (and Redis, by INFO) over a phase, as % of one core."""

    def __init__(self, client: AnyRedis, pids: dict[str, int]):
        self.client, self.pids = client, pids

    async def __aenter__(self) -> CpuMeter:
        self.t0 = time.monotonic()
        self.start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.start["redis"] = await redis_cpu(self.client)
        self.start["bench"] = time.process_time()
        self.machine = machine_busy()
        return self

    async def __aexit__(self, *exc: object) -> None:
        wall = time.monotonic() - self.t0
        end = {name: cpu_seconds(pid) for name, pid in self.pids.items() if Path(f"/proc/{pid}").exists()}
        end["redis"] = await redis_cpu(self.client)
        end["bench"] = time.process_time()
        self.used = {name: end[name] - self.start[name] for name in end}  # CPU seconds
        self.shares = {name: used / wall * 100 for name, used in self.used.items()}
        busy, total = machine_busy()
        # the machine's busy share of all its cores, other sessions' processes included
        self.busy = (busy - self.machine[0]) / (total - self.machine[1]) * (os.cpu_count() or 1) * 100

    def joiners(self) -> float:
        """CPU seconds of the processes doing the join (workers or raw loops)."""
        return sum(used for name, used in self.used.items() if name.startswith(("worker", "raw")))

    def text(self) -> str:
        return ("CPU, % of one core: " + ", ".join(f"{name} {share:.0f}" for name, share in self.shares.items())
                + f"; the whole machine {self.busy:.0f} of {(os.cpu_count() or 1) * 100}")
