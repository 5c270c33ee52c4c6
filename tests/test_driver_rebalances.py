"""Two faust workers through many rebalances: clean restarts of a table app with standby
replicas. Real worker processes on the session's Redis."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

from streams.connection import AnyRedis
from streams.keys import Keys
from tests.driver_harness import (
    WorkerProcess,
    broker_url,
    group_state,
    numbered,
    probe_table,
    produce,
    read_topic,
    wait_until,
)

GROUP = "drivertest"
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
