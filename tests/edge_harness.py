"""A running edge (in-process test server or a real `tickwave edge` process) and a WebSocket client."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from edge.app import create_app
from edge.settings import EdgeSettings
from tickwave.servers import free_port


def edge_settings(redis_url: str, keys: Any, database_url: str | None = None, **over: Any) -> EdgeSettings:
    base: dict[str, Any] = dict(redis_url=redis_url, database_url=database_url, key_prefix=keys.prefix,
                                edge_node="test-node", edge_port=free_port())
    base.update(over)
    return EdgeSettings(**base)


@asynccontextmanager
async def running_edge(settings: EdgeSettings):
    server = TestServer(create_app(settings), port=settings.edge_port)
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close()


async def edge_connections(redis: Any, node: str) -> int:
    """Connections Redis has open for the edge node `node` (the edge names each of them)."""
    return sum(1 for c in await redis.client_list() if c.get("name") == f"tickwave-edge-{node}")


async def stored_keys(redis: Any, keys: Any) -> list[bytes]:
    """Every Redis key under the test's prefix, sorted."""
    return sorted([k async for k in redis.scan_iter(match=f"{keys.prefix}*", count=1000)])


class Client:
    """A WebSocket client that remembers every frame it received."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def send(self, doc: dict[str, Any] | str) -> None:
        await self.ws.send_str(doc if isinstance(doc, str) else json.dumps(doc))

    async def next(self, timeout: float = 5.0, type: str | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"no {type or 'frame'} within {timeout}s")
            msg = await self.ws.receive(timeout=left)
            if msg.type != aiohttp.WSMsgType.TEXT:
                pytest.fail(f"connection ended while waiting for {type or 'a frame'}: {msg.type} {msg.data!r}")
            doc = json.loads(msg.data)
            self.frames.append(doc)
            if type is None or doc["type"] == type:
                return doc

    async def drain(self, quiet: float = 0.3) -> None:
        """Keep reading until nothing arrives for `quiet` seconds."""
        while True:
            try:
                msg = await self.ws.receive(timeout=quiet)
            except asyncio.TimeoutError:
                return
            if msg.type != aiohttp.WSMsgType.TEXT:
                return
            self.frames.append(json.loads(msg.data))

    async def closed(self, timeout: float = 5.0) -> int | None:
        """Read until the server closes; returns the close code."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = await self.ws.receive(timeout=deadline - time.monotonic())
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return self.ws.close_code
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.frames.append(json.loads(msg.data))
        pytest.fail(f"server did not close within {timeout}s")

    def event_ids(self, target: str | None = None) -> list[str]:
        ids = []
        for f in self.frames:
            if f["type"] == "price_update" and not f.get("snapshot") and (target is None or f["target"] == target):
                ids += [row["event_id"] for row in f["data"]]
        return ids


@asynccontextmanager
async def ws_client(base: str, path: str = "/ws/stock/prices", **kw: Any):
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(base + path, **kw) as ws:
            client = Client(ws)
            yield client


class EdgeProcess:
    """`tickwave edge` as a real process, for tests where a node dies."""

    def __init__(self, redis_url: str, keys: Any, node: str, database_url: str | None = None):
        self.port = free_port()
        env = {**os.environ, "REDIS_URL": redis_url, "TICKWAVE_KEY_PREFIX": keys.prefix,
               "TICKWAVE_EDGE_PORT": str(self.port), "TICKWAVE_EDGE_NODE": node, "TICKWAVE_EDGE_HOST": "127.0.0.1"}
        env.pop("DATABASE_URL", None)
        if database_url:
            env["DATABASE_URL"] = database_url
        self.proc = subprocess.Popen([sys.executable, "-m", "tickwave", "edge"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"

    async def ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                try:
                    async with s.get(self.base + "/healthz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        pytest.fail(f"edge on {self.port} not ready within {timeout}s")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(5)
