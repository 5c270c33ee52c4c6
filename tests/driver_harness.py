"""Helpers for the faust driver tests: worker processes, producing and reading topics, group state."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faust.types import TP

from streams.codec import Record, decode_record, encode_record
from streams.connection import AnyRedis
from streams.driver.group import field_tp
from streams.keys import Keys
from streams.log import PartitionLog
from streams.partition import partition_for
from tests.topic_reads import bounds, read_entries

REPO = Path(__file__).resolve().parents[1]
SESSION_TIMEOUT = 4.0


def broker_url(redis_url: str, keys: Keys, **params: Any) -> str:
    """The driver URL for a test: its own key prefix, a short lease."""
    query = {"prefix": keys.prefix, "session_timeout": SESSION_TIMEOUT, "heartbeat_interval": 0.5} | params
    return redis_url + "?" + "&".join(f"{k}={v}" for k, v in query.items())


class WorkerProcess:
    """`python -m <module> worker` (tests.driver_app unless told) in its own process, logging to a file."""

    def __init__(self, broker: str, workdir: Path, name: str, *, module: str = "tests.driver_app", **env: str):
        self.name = name
        self.module = module
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.logfile = self.workdir / "worker.log"
        self.env = {**os.environ, "DRIVER_BROKER": broker, "DRIVER_DATADIR": str(self.workdir / "data"), **env}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with open(self.logfile, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, "worker", "-l", "info", "--without-web"],
                cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no commit, no leave; only the lease tells the group."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30, sig: signal.Signals = signal.SIGTERM) -> int:
        """SIGTERM (or `sig`, e.g. SIGINT) and wait: faust commits and the driver leaves the group."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise AssertionError(f"worker {self.name} did not stop within {timeout}s:\n{self.log()[-3000:]}")
        return int(self.proc.returncode)

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, reason: str,
                     workers: Iterable[WorkerProcess] = ()) -> float:
    """Poll `check` until true; fail naming `reason` (with the workers' log tails) after `timeout`.
    Returns the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await check():
        if loop.time() - start > timeout:
            tails = "\n".join(f"--- {w.name} ---\n{w.log()[-4000:]}" for w in workers)
            raise AssertionError(f"{reason} (after {timeout}s)\n{tails}")
        await asyncio.sleep(0.1)
    return loop.time() - start


def numbered(start: int, n: int, keys: int = 40) -> list[tuple[bytes, bytes]]:
    """Records whose values are unique numbers, spread over `keys` keys."""
    return [(f"k{i % keys}".encode(), str(i).encode()) for i in range(start, start + n)]


async def produce(client: AnyRedis, keys: Keys, topic: str, records: list[tuple[bytes, bytes]],
                  partitions: int = 8) -> None:
    """Append keyed records the way any producer does (the shared partitioner, dense offsets)."""
    batches: dict[int, list[Any]] = {}
    for key, value in records:
        batches.setdefault(partition_for(key, partitions), []).append(encode_record(key, value))
    await PartitionLog(client, keys, topic).append_many(batches)


async def read_topic(client: AnyRedis, keys: Keys, topic: str, partitions: int = 8) -> list[Record]:
    out: list[Record] = []
    for p in range(partitions):
        offset = 0
        while True:
            entries = await read_entries(client, keys, topic, p, offset, 5000)
            if not entries:
                break
            out.extend(decode_record(*e) for e in entries)
            offset = out[-1].offset + 1
    return out


async def values(client: AnyRedis, keys: Keys, topic: str) -> list[int]:
    return [int(r.value or b"-1") for r in await read_topic(client, keys, topic)]


@dataclass
class GroupState:
    members: list[str]
    generation: int
    round: int
    settled: bool  # the current round has its assignment
    owners: dict[TP, str]

    def owner_of(self, topic: str) -> set[str]:
        return {m for tp, m in self.owners.items() if tp.topic == topic}

    def partitions_of(self, member: str, topic: str) -> set[int]:
        return {tp.partition for tp, m in self.owners.items() if tp.topic == topic and m == member}


async def group_state(client: AnyRedis, keys: Keys, group: str) -> GroupState:
    members = [m.decode() for m in await client.zrange(keys.group(group, "members"), 0, -1)]
    meta = {k.decode(): v.decode() for k, v in (await client.hgetall(keys.group(group, "meta"))).items()}
    owners = {field_tp(k): v.decode().rpartition("|")[0]
              for k, v in (await client.hgetall(keys.group(group, "owners"))).items()}
    rnd = int(meta.get("round", -1))
    return GroupState(members, int(meta.get("gen", 0)), rnd, meta.get("gen_round") == str(rnd), owners)


async def committed(client: AnyRedis, keys: Keys, group: str) -> dict[TP, int]:
    # a value committed in a partition generation > 0 reads "<offset>@<gen>"
    return {field_tp(k): int(v.split(b"@")[0]) for k, v in (await client.hgetall(keys.group(group, "offsets"))).items()}


async def probe_table(client: AnyRedis, keys: Keys, timeout: float = 20) -> dict[str, int]:
    """Ask the worker for its table (the `dump` agent) and wait for the answer."""
    # a topic an app only sends to is declared with its default partition count (as Kafka's
    # auto-create does), and unkeyed answers go round-robin: look at every partition
    partitions = range(int(await client.hget(keys.topic_meta("probe-reply"), "partitions") or 16))
    before = {p: (await bounds(client, keys, "probe-reply", p))[1] for p in partitions}
    await produce(client, keys, "probe", [(b"", b"?")], partitions=1)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        for p in partitions:
            entries = await read_entries(client, keys, "probe-reply", p, before[p], 1)
            if entries:
                return json.loads(decode_record(*entries[0]).value or b"{}")
        await asyncio.sleep(0.1)
    raise AssertionError("the worker did not answer the table probe")
