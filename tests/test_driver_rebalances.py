"""Two faust workers through many rebalances: clean restarts of a table app with standby
replicas, and a kill loop. Real worker processes on the session's Redis."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

from faust.types import TP

from streams.codec import decode_record
from streams.connection import AnyRedis
from streams.keys import Keys
from tests.topic_reads import bounds, read_entries
from streams.partition import partition_for
from tests.driver_harness import (
    SESSION_TIMEOUT,
    WorkerProcess,
    broker_url,
    committed,
    group_state,
    numbered,
    probe_table,
    produce,
    read_topic,
    wait_until,
)

GROUP = "drivertest"
PARTITIONS = 8
KEYS = 128  # k0..k127 reach all 8 partitions (k0..k39 never land on partition 7)


class Feed:
    """Numbered records on `src`, a batch at a time, until stopped: work always in flight."""

    def __init__(self, client: AnyRedis, keys: Keys, batch: int = 20, pause: float = 0.05):
        self.client, self.keys, self.batch, self.pause = client, keys, batch, pause
        self.sent = 0
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Feed:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while not self._stopping.is_set():
            await produce(self.client, self.keys, "src", numbered(self.sent, self.batch, keys=KEYS))
            self.sent += self.batch
            try:
                await asyncio.wait_for(self._stopping.wait(), self.pause)
            except asyncio.TimeoutError:
                pass

    async def stop(self) -> int:
        """Stop after the batch being written; returns how many records were sent."""
        assert self._task is not None
        self._stopping.set()
        await self._task
        return self.sent


async def processed(client: AnyRedis, keys: Keys) -> Counter[int]:
    """How many times each number went through the relay agent."""
    return Counter(int(r.value or b"-1") for r in await read_topic(client, keys, "dst"))


def errors_in(worker: WorkerProcess) -> list[str]:
    return [line for line in worker.log().splitlines()
            if "Crashed reason" in line or "Traceback" in line or "[CRITICAL]" in line]


async def both_hold_source_partitions(client: AnyRedis, keys: Keys) -> bool:
    state = await group_state(client, keys, GROUP)
    return state.settled and len(state.members) == 2 and len(state.owner_of("src")) == 2


async def test_two_table_workers_restarted_ten_times_never_process_a_committed_message_twice(
        redis_url, redis, keys, tmp_path: Path):
    broker = broker_url(redis_url, keys)
    workers = [WorkerProcess(broker, tmp_path, name, DRIVER_DELAY="0.001") for name in ("a", "b")]
    for w in workers:
        w.start()
    feed: Feed | None = None
    try:
        await wait_until(lambda: both_hold_source_partitions(redis, keys), 60,
                         "the two workers never shared the partitions", workers)
        feed = Feed(redis, keys).start()
        for restart in range(10):
            worker = workers[restart % 2]
            sig = signal.SIGTERM if restart % 4 < 2 else signal.SIGINT
            await asyncio.sleep(0.5)  # let work pile up in flight on both
            assert worker.stop(sig=sig) == 0, f"{worker.name} did not stop cleanly on {sig.name}"
            worker.start()
            await wait_until(lambda: both_hold_source_partitions(redis, keys), 60,
                             f"restart {restart + 1}: the two workers never shared the partitions again", workers)
        total = await feed.stop()
        feed = None

        async def all_processed() -> bool:
            return set(await processed(redis, keys)) >= set(range(total))
        await wait_until(all_processed, 90, "not every record was processed", workers)
        await asyncio.sleep(1.0)  # anything processed twice would show by now
        assert workers[0].stop() == 0
        table = await probe_table(redis, keys, timeout=60)  # b alone holds every partition of the table
    finally:
        if feed is not None:
            await feed.stop()
        for w in workers:
            w.kill()
    counts = await processed(redis, keys)
    assert set(counts) == set(range(total))
    twice = sorted(v for v, n in counts.items() if n > 1)
    assert twice == [], (f"{len(twice)} committed messages processed again after clean rebalances: {twice[:20]} "
                         f"by {await _processed_by(redis, keys, set(twice[:20]))}")
    expected = Counter(f"k{i % KEYS}" for i in range(total))
    assert table == dict(expected), "the table lost or double-counted updates across the restarts"
    for w in workers:
        assert errors_in(w) == [], f"{w.name} logged a crash:\n" + "\n".join(errors_in(w)[:10])


async def _processed_by(client: AnyRedis, keys: Keys, numbers: set[int]) -> dict[int, list[tuple[int, int]]]:
    """For a failure message: (pid, dst offset) of each time these numbers were relayed."""
    out: dict[int, list[tuple[int, int]]] = {}
    for r in await read_topic(client, keys, "dst"):
        if int(r.value or b"-1") in numbers:
            out.setdefault(int(r.value or b"-1"), []).append((int(dict(r.headers)["by"]), r.offset))
    return out


def pid_of(member: str) -> int:
    """Member ids are <host>-<pid>-<random>."""
    return int(member.rsplit("-", 2)[-2])


async def ends(client: AnyRedis, keys: Keys, topic: str) -> dict[int, int]:
    return {p: (await bounds(client, keys, topic, p))[1] for p in range(PARTITIONS)}


async def processors_since(client: AnyRedis, keys: Keys, marks: dict[int, int]) -> dict[int, list[int]]:
    """Per partition, the pid (the `by` header) of each record relayed to `dst` after `marks`."""
    out: dict[int, list[int]] = {}
    for p, mark in marks.items():
        records = [decode_record(*e) for e in await read_entries(client, keys, "dst", p, mark, 100_000)]
        out[p] = [int(dict(r.headers)["by"]) for r in records]
    return out


STALL = 15.0  # seconds a survivor's agent stays on one event: longer than any handover may take


async def test_after_each_kill_every_partition_has_one_progressing_owner_within_the_lease(
        redis_url, redis, keys, tmp_path: Path):
    broker = broker_url(redis_url, keys)
    workers = [WorkerProcess(broker, tmp_path, name, DRIVER_DELAY="0.001") for name in ("a", "b")]
    for w in workers:
        w.start()
    feed: Feed | None = None
    loop = asyncio.get_running_loop()
    took: list[float] = []
    try:
        feed = Feed(redis, keys).start()
        for kill in range(4):
            victim, survivor = workers[kill % 2], workers[1 - kill % 2]
            # every other kill lands while the survivor's agent is busy on one event, as when
            # faust's stress app pauses its stream: the survivor cannot hand over at once
            busy = kill % 2 == 1
            await wait_until(lambda: both_hold_source_partitions(redis, keys), 60,
                             f"kill {kill + 1}: the two workers never shared the partitions", workers)
            before = await ends(redis, keys, "dst")
            await asyncio.sleep(1.5)
            # the kill must land mid-stream: the victim relayed records a moment ago...
            recent = await processors_since(redis, keys, before)
            assert any(victim.pid in pids for pids in recent.values()), f"kill {kill + 1}: {victim.name} was idle"
            state = await group_state(redis, keys, GROUP)
            members = {pid_of(m): m for m in state.members}
            mine = {TP("src", p) for p in state.partitions_of(members[victim.pid], "src")}
            if busy:
                partition = min(state.partitions_of(members[survivor.pid], "src"))
                key = next(f"s{i}".encode() for i in range(1000) if partition_for(f"s{i}".encode(), 8) == partition)
                await produce(redis, keys, "src", [(key, f"stall:{survivor.pid}:{STALL}".encode())])
                await wait_until(lambda: _logged(survivor, f"stalling pid={survivor.pid}"), 10,
                                 f"kill {kill + 1}: the survivor's agent never got busy", workers)
            victim.kill()
            killed_at = loop.time()
            # ...and left work it had not committed (a dead process commits nothing more)
            offsets, src_ends = await committed(redis, keys, GROUP), await ends(redis, keys, "src")
            assert any(offsets.get(tp, 0) < src_ends[tp.partition] for tp in mine), \
                f"kill {kill + 1}: {victim.name} had nothing in flight"
            victim.start()

            async def one_progressing_owner_each() -> bool:
                state = await group_state(redis, keys, GROUP)
                alive = {victim.pid, survivor.pid}
                owners = {tp.partition: pid_of(m) for tp, m in state.owners.items() if tp.topic == "src"}
                if not (state.settled and sorted(owners) == list(range(PARTITIONS))
                        and set(owners.values()) <= alive and {pid_of(m) for m in state.members} <= alive):
                    return False
                marks = await ends(redis, keys, "dst")
                await wait_until(lambda: _each_partition_moved(redis, keys, marks), 10,
                                 f"kill {kill + 1}: a partition made no progress under its owner", workers)
                by = await processors_since(redis, keys, marks)
                strangers = {p: set(pids) - {owners[p]} for p, pids in by.items() if set(pids) - {owners[p]}}
                assert not strangers, (f"kill {kill + 1}: partitions read by a process that does not own them "
                                       f"{strangers} (owners {owners})")
                return True
            await wait_until(one_progressing_owner_each, SESSION_TIMEOUT + 30,
                             f"kill {kill + 1}: the partitions never settled on one progressing owner each", workers)
            took.append(loop.time() - killed_at)
        total = await feed.stop()
        feed = None

        async def all_processed() -> bool:
            return set(await processed(redis, keys)) >= set(range(total))
        await wait_until(all_processed, 90, "records were lost across the kills", workers)
    finally:
        if feed is not None:
            await feed.stop()
        for w in workers:
            w.kill()
    print(f"kill to one progressing owner per partition: {', '.join(f'{t:.1f}s' for t in took)}")
    assert max(took) < SESSION_TIMEOUT + 6, f"ownership took {max(took):.1f}s to settle for a {SESSION_TIMEOUT}s lease"
    for w in workers:
        assert errors_in(w) == [], f"{w.name} logged a crash:\n" + "\n".join(errors_in(w)[:10])


async def _logged(worker: WorkerProcess, text: str) -> bool:
    return text in worker.log()


async def _each_partition_moved(client: AnyRedis, keys: Keys, marks: dict[int, int]) -> bool:
    now = await ends(client, keys, "dst")
    return all(now[p] > marks[p] for p in range(PARTITIONS))
