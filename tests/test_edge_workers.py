"""`tickwave edge --workers N`: several edge processes on one port (SO_REUSEPORT), each its own
node and consumer group, and a client that resumes across them with no gap and no duplicate."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest

from streams.events import EventLog
from tests.edge_harness import Client
from tests.factories import price_changes
from tickwave.servers import free_port

WORKERS = 2


class Workers:
    """`tickwave edge --workers 2` in a process group of its own."""

    def __init__(self, redis_url: str, keys, node: str):
        self.port = free_port()
        env = {**os.environ, "REDIS_URL": redis_url, "TICKWAVE_KEY_PREFIX": keys.prefix,
               "TICKWAVE_EDGE_PORT": str(self.port), "TICKWAVE_EDGE_NODE": node, "TICKWAVE_EDGE_HOST": "127.0.0.1"}
        env.pop("DATABASE_URL", None)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "tickwave", "edge", "--workers", str(WORKERS)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.base = f"http://127.0.0.1:{self.port}"

    def children(self) -> list[int]:
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            return [int(x) for x in f.read().split()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


async def connected_to(base: str, node: str | None = None, other_than: str | None = None, timeout: float = 20):
    """A client whose `connected` frame names `node` (or any node but `other_than`): new connections
    land on whichever process the kernel picks, so connect again until one does."""
    deadline = time.monotonic() + timeout
    tried: list[str] = []
    while time.monotonic() < deadline:
        try:
            session = aiohttp.ClientSession()
            ws = await session.ws_connect(base + "/ws")
        except aiohttp.ClientError:
            await session.close()
            await asyncio.sleep(0.1)
            continue
        client = Client(ws)
        hello = await client.next(type="connected")
        if (node is None or hello["node"] == node) and hello["node"] != other_than:
            return session, client, hello["node"]
        tried.append(hello["node"])
        await ws.close()
        await session.close()
    pytest.fail(f"no connection to {node or f'a node other than {other_than}'} in {timeout}s; got {tried[-10:]}")


async def test_a_client_resumes_across_edge_processes_on_one_port_with_no_gap_and_no_duplicate(
        redis_url, keys, redis):
    log = EventLog(redis, keys)
    await log.append_events("volume_wave", price_changes(5))
    edge = Workers(redis_url, keys, "wk")
    stopping = False
    offset = 100

    async def feed() -> None:
        nonlocal offset
        while not stopping:
            await log.append_events("volume_wave", price_changes(3, start=offset))
            offset += 3
            await asyncio.sleep(0.01)

    feeder = None
    try:
        # both processes serve the one port, each as its own node
        nodes = set()
        for want in ("wk-0", "wk-1"):
            session, client, node = await connected_to(edge.base, node=want)
            nodes.add(node)
            await client.ws.close()
            await session.close()
        assert nodes == {"wk-0", "wk-1"} and len(edge.children()) == WORKERS

        feeder = asyncio.create_task(feed())
        session, first, node_a = await connected_to(edge.base)
        await first.send({"type": "subscribe", "target": "volume_wave"})
        sub = await first.next(type="subscribed")
        while len(first.event_ids()) < 30:
            await first.next(type="price_update")
        seen = first.event_ids()
        await first.ws.close()
        await session.close()

        session, second, node_b = await connected_to(edge.base, other_than=node_a)
        assert node_b != node_a
        await second.send({"type": "subscribe", "target": "volume_wave", "last_event_id": seen[-1],
                           "epoch": sub["epoch"]})
        resumed = await second.next(type="subscribed")
        assert resumed["recovered"] is True and resumed["replayed"] > 0  # events went by while away
        while len(second.event_ids()) < 30:
            await second.next(type="price_update")
        seen += second.event_ids()
        await second.ws.close()
        await session.close()
        stopping = True
        await feeder

        # every node tails through a consumer group of its own
        groups = {g["name"].decode() for g in await redis.xinfo_groups(keys.events("volume_wave"))}
        assert {"edge:wk-0", "edge:wk-1"} <= groups
    finally:
        stopping = True
        if feeder is not None:
            await asyncio.gather(feeder, return_exceptions=True)
        if edge.proc.poll() is None:
            edge.proc.send_signal(signal.SIGTERM)
            try:
                edge.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        stopped_cleanly = edge.proc.poll() == 0
        edge.kill()
    # exactly the stream's events from the first one seen, in order: no gap, no duplicate
    stream = [eid.decode() for eid, _ in await redis.xrange(keys.events("volume_wave"))]
    start = stream.index(seen[0])
    assert seen == stream[start:start + len(seen)]
    assert stopped_cleanly, "SIGTERM did not stop the edge processes cleanly"


async def test_metrics_of_every_edge_process_are_summed_on_the_shared_port(redis_url, keys, redis):
    log = EventLog(redis, keys)
    await log.append_events("volume_wave", price_changes(5))
    edge = Workers(redis_url, keys, "wm")
    clients = []
    try:
        for want in ("wm-0", "wm-1"):
            clients.append(await connected_to(edge.base, node=want))
        async with aiohttp.ClientSession() as s:
            # any process answers the scrape; each must count both connections
            for _ in range(6):
                async with s.get(edge.base + "/metrics") as r:
                    text = await r.text()
                value = next(float(row.split()[-1]) for row in text.splitlines()
                             if row.startswith("tickwave_edge_connections "))
                assert value == 2, text
    finally:
        for session, client, _ in clients:
            await client.ws.close()
            await session.close()
        edge.kill()
