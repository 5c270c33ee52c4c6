"""faust features beyond agents and tables, with real worker processes: a `group_by` whose
repartition topic has a long generated name, agent.ask / join / map from a separate
client process, and workers asking their own agents across a rebalance."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from streams.codec import encode_record
from streams.connection import AnyRedis
from streams.keys import Keys
from streams.log import PartitionLog
from streams.partition import partition_for
from tests.driver_harness import REPO, WorkerProcess, broker_url, group_state, probe_table, wait_until

ORDERS = 400


async def produce_orders(client: AnyRedis, keys: Keys, n: int) -> Counter[str]:
    """Orders keyed by order id on 4 partitions; returns the expected total per account."""
    batches: dict[int, list] = {}
    totals: Counter[str] = Counter()
    for i in range(n):
        account, key = f"acct{i % 7}", f"order-{i}".encode()
        totals[account] += i
        value = json.dumps({"account": account, "amount": i})
        batches.setdefault(partition_for(key, 4), []).append(encode_record(key, value.encode()))
    await PartitionLog(client, keys, "orders").append_many(batches)
    return totals


async def test_a_group_by_through_a_200_character_repartition_topic_feeds_its_table(redis_url, redis, keys,
                                                                                   tmp_path: Path):
    worker = WorkerProcess(broker_url(redis_url, keys), tmp_path, "a", module="tests.driver_groupby_app").start()
    try:
        expected = await produce_orders(redis, keys, ORDERS)

        async def totals_complete() -> bool:
            return await probe_table(redis, keys, timeout=30) == dict(expected)
        await wait_until(totals_complete, 60, "the table fed through the repartition topic never held every order",
                         [worker])
        topics = {t.decode() for t in await redis.smembers(keys.topics())}
        (repartition,) = [t for t in topics if t.endswith("-orders-Order.account-repartition")]
        assert len(repartition) == 200
        assert sum([await redis.xlen(keys.topic_partition(repartition, p)) for p in range(4)]) == ORDERS
    finally:
        assert worker.stop() == 0
    assert "Crashed" not in worker.log()


@pytest.mark.parametrize("where", ["repartition", "send"])
async def test_a_topic_name_the_driver_refuses_stops_the_worker_with_the_reason(where: str, redis_url, redis, keys,
                                                                              tmp_path: Path):
    # a 250-character name: the repartition topic is declared at start-up; a topic an agent
    # only sends to is met at its first send, where a crash would only restart the agent
    env = {"DRIVER_TOPIC_LENGTH": "250"} if where == "repartition" else {"DRIVER_AUDIT_TOPIC": "audit-" + "x" * 244}
    worker = WorkerProcess(broker_url(redis_url, keys), tmp_path, "a", module="tests.driver_groupby_app",
                           **env).start()
    assert worker.proc is not None
    if where == "send":
        await produce_orders(redis, keys, 1)
    try:
        code = await asyncio.get_running_loop().run_in_executor(None, lambda: worker.proc.wait(60))
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the worker kept running with a refused topic:\n{worker.log()[-3000:]}") from None
    finally:
        worker.kill()
    assert code != 0
    assert "at most 249 characters" in worker.log(), worker.log()[-3000:]


def run_client(broker: str, tmp_path: Path, *command: str, timeout: float = 30) -> str:
    """`python -m tests.driver_rpc_app <command>` in its own process; its output."""
    env = {**os.environ, "DRIVER_BROKER": broker, "DRIVER_DATADIR": str(tmp_path / "client")}
    try:
        done = subprocess.run([sys.executable, "-m", "tests.driver_rpc_app", *command], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        raise AssertionError(f"`{' '.join(command)}` from a client process never returned:\n{out[-3000:]}") from None
    assert done.returncode == 0, f"`{' '.join(command)}` failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture
def rpc_worker(redis_url, redis, keys, tmp_path: Path):
    broker = broker_url(redis_url, keys)
    # its own join of 500 values first: more replies than its stream buffers hold (faust's
    # BarrierState takes at most 1000 before the join reads them)
    worker = WorkerProcess(broker, tmp_path, "worker", module="tests.driver_rpc_app", DRIVER_SELF_JOIN="500",
                           DRIVER_STREAM_BUFFER="100").start()
    try:
        yield broker, worker
    finally:
        assert worker.stop() == 0


async def test_agent_ask_join_and_map_answer_a_separate_client_process(rpc_worker, redis, keys, tmp_path: Path):
    broker, worker = rpc_worker

    async def serving() -> bool:
        return "Worker ready" in worker.log()
    await wait_until(serving, 60, "the rpc worker never became ready", [worker])
    loop = asyncio.get_running_loop()
    asked = await loop.run_in_executor(None, run_client, broker, tmp_path, "ask", "3")
    assert "ask: 300.0" in asked
    joined = await loop.run_in_executor(None, run_client, broker, tmp_path, "join", "1", "2", "3", "4")
    assert "join: [100.0, 200.0, 300.0, 400.0]" in joined
    mapped = await loop.run_in_executor(None, run_client, broker, tmp_path, "map", "5", "6", "7")
    assert "map: [500.0, 600.0, 700.0]" in mapped


async def test_workers_asking_their_own_agents_get_answers_across_a_rebalance_and_stop(rpc_worker, redis, keys,
                                                                                      tmp_path: Path):
    # a reply the worker's reply stream has taken stays unacked until the next one comes: it
    # must neither hold up a rebalance or a stop, nor be delivered again after the rebalance
    broker, first = rpc_worker
    await wait_until(lambda: _logged(first, "self-join: 500 answers"), 60,
                     "the worker's join of 500 values never completed", [first])

    def answers(worker: WorkerProcess) -> int:
        return worker.log().count("self-ask: 100.0")

    async def answered(worker: WorkerProcess, more_than: int) -> bool:
        return answers(worker) > more_than
    await wait_until(lambda: answered(first, 2), 60, "the worker never got answers to its own asks", [first])
    second = WorkerProcess(broker, tmp_path, "second", module="tests.driver_rpc_app").start()
    try:
        async def both_members() -> bool:
            state = await group_state(redis, keys, "drivertest-rpc")
            return state.settled and len(state.members) == 2
        await wait_until(both_members, 60, "the second worker never joined", [first, second])
        before = answers(first)
        await wait_until(lambda: answered(first, before + 2), 30, "the first worker's asks stopped being answered",
                         [first, second])
        await wait_until(lambda: answered(second, 2), 30, "the second worker's asks were never answered",
                         [first, second])
    finally:
        assert second.stop() == 0, "a worker that asks its agents did not stop"
    for worker in (first, second):
        assert "Crashed" not in worker.log() and "stepping aside" not in worker.log(), worker.log()[-3000:]


async def _logged(worker: WorkerProcess, text: str) -> bool:
    return text in worker.log()
