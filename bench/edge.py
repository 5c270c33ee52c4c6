"""bench/edge: (a) fan-out to 1,000 clients beside python-socketio with its Redis manager,
(b) memory per idle connection beside a bare aiohttp WebSocket server, (c) resume of
10,000 missed events beside a raw XRANGE of them. Loopback only, bounded in time.

    python -m bench.edge [fanout|idle|resume|all] [--clients 1000] [--per-batch 25] [--seconds 10]
                         [--idle 10000] [--missed 10000]

Needs the `bench` extra (python-socketio) for (a).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from agents.generator import PriceWalk
from schemas.universe import default_universe
from bench._common import drop_prefix, fresh_keys, line, redis_url
from streams.connection import connect
from streams.events import EventLog
from streams.keys import Keys
from tickwave.servers import free_port


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for row in f:
            if row.startswith("VmRSS:"):
                return int(row.split()[1])
    raise RuntimeError("no VmRSS")


async def wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                async with s.get(f"http://127.0.0.1:{port}/healthz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"server on {port} not healthy in {timeout}s")


def start_edge(url: str, keys: Keys, port: int, log: Path | None = None, **env: str) -> subprocess.Popen[bytes]:
    """`tickwave edge` on `port`, logging warnings to `log` (else nowhere)."""
    full = {**os.environ, "REDIS_URL": url, "TICKWAVE_KEY_PREFIX": keys.prefix, "TICKWAVE_EDGE_PORT": str(port),
            "TICKWAVE_EDGE_HOST": "127.0.0.1", "TICKWAVE_EDGE_NODE": f"bench-{uuid.uuid4().hex[:6]}",
            "TICKWAVE_EDGE_MAX_CONNECTIONS_PER_IP": "100000", "TICKWAVE_LOG_LEVEL": "WARNING", **env}
    full.pop("DATABASE_URL", None)
    if log is None:
        return subprocess.Popen([sys.executable, "-m", "tickwave", "edge"], env=full,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "tickwave", "edge"], env=full,
                                stdout=out, stderr=subprocess.STDOUT)


def start_script(module: str, port: int, url: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REDIS_URL": url, "SIO_CHANNEL": f"sio-{uuid.uuid4().hex[:6]}"}
    return subprocess.Popen([sys.executable, "-m", module, str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


# --- (b) idle connections --------------------------------------------------------------

async def open_idle(port: int, n: int, path: str, expect_hello: bool) -> tuple[aiohttp.ClientSession, list[Any]]:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    socks: list[Any] = []
    sem = asyncio.Semaphore(200)

    async def one() -> None:
        async with sem:
            ws = await session.ws_connect(f"http://127.0.0.1:{port}{path}", autoping=True, heartbeat=None)
            if expect_hello:
                await ws.receive(timeout=30)
            socks.append(ws)

    await asyncio.gather(*(one() for _ in range(n)))
    return session, socks


async def idle(url: str, n: int) -> None:
    async def measure(proc: subprocess.Popen[bytes], port: int, path: str, hello: bool) -> float:
        await wait_healthy(port, proc)
        before = rss_kb(proc.pid)
        session, socks = await open_idle(port, n, path, hello)
        await asyncio.sleep(2)
        after = rss_kb(proc.pid)
        for ws in socks:
            await ws.close()
        await session.close()
        return (after - before) * 1024 / n

    keys = fresh_keys()
    port = free_port()
    proc = start_edge(url, keys, port, TICKWAVE_EDGE_HEARTBEAT_S="3600")
    try:
        ours = await measure(proc, port, "/ws", True)
    finally:
        stop(proc)
    port = free_port()
    proc = start_script("bench.edge_baselines.plain_ws_server", port, url)
    try:
        base = await measure(proc, port, "/ws", False)
    finally:
        stop(proc)
    print(line(f"(b) memory per idle connection ({n:,})", ours / 1024, "KB", base / 1024, "bare aiohttp WS"))


# --- (c) resume ---------------------------------------------------------------------------

async def resume(url: str, missed: int) -> None:
    keys = fresh_keys()
    client = connect(url)
    log = EventLog(client, keys)
    walk = PriceWalk(default_universe().pick(20), "bench", seed=2)
    first = await log.append_events("bench", [walk.next_event() for _ in range(10)])
    ids: list[str] = []
    for start in range(0, missed, 1000):
        ids += await log.append_events("bench", [walk.next_event() for _ in range(min(1000, missed - start))])
    port = free_port()
    proc = start_edge(url, keys, port)
    samples, raw = [], []
    try:
        await wait_healthy(port, proc)
        async with aiohttp.ClientSession() as s:
            for _ in range(5):
                async with s.ws_connect(f"http://127.0.0.1:{port}/ws", max_msg_size=0) as ws:
                    await ws.receive()
                    t = time.perf_counter()
                    await ws.send_str(json.dumps({"type": "subscribe", "target": "bench", "last_event_id": first[-1]}))
                    got = 0
                    while True:
                        doc = json.loads((await ws.receive(timeout=30)).data)
                        if doc["type"] == "price_update":
                            got += doc["count"]
                            if doc["event_id"] == ids[-1]:
                                break
                    samples.append((time.perf_counter() - t) * 1000)
                    assert got == missed, got
                t = time.perf_counter()
                await client.xrange(keys.events("bench"), min=f"({first[-1]}", count=missed)
                raw.append((time.perf_counter() - t) * 1000)
    finally:
        stop(proc)
        await drop_prefix(client, keys)
        await client.aclose()
    print(line(f"(c) resume of {missed:,} missed events", statistics.median(samples), "ms",
               statistics.median(raw), "raw XRANGE"))


# --- (a) fan-out --------------------------------------------------------------------------

class Tally:
    def __init__(self) -> None:
        self.events = 0
        self.latencies: list[float] = []

    def frame(self, rows: list[dict[str, Any]], now: float) -> None:
        self.events += len(rows)
        ingest = rows[0].get("ingest_ms")
        if ingest:
            self.latencies.append(now - ingest / 1000)


async def feed(write: Callable[[list[Any]], Awaitable[None]], walk: PriceWalk, seconds: float, per_batch: int,
               every: float) -> int:
    sent = 0
    end = time.monotonic() + seconds
    next_at = time.monotonic()
    while time.monotonic() < end:
        await write([walk.next_event() for _ in range(per_batch)])
        sent += per_batch
        next_at += every
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    return sent


async def fanout_ours(url: str, n: int, seconds: float, per_batch: int, every: float) -> tuple[float, Tally, int]:
    keys = fresh_keys()
    client = connect(url)
    log = EventLog(client, keys)
    port = free_port()
    proc = start_edge(url, keys, port)
    tally = Tally()
    stop_at = [0.0]
    walk = PriceWalk(default_universe().pick(20), "bench", seed=3)
    try:
        await log.append_events("bench", [walk.next_event()])  # only a strategy with events is subscribable
        await wait_healthy(port, proc)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        ready = asyncio.Event()
        subscribed = [0]

        async def one() -> None:
            async with session.ws_connect(f"http://127.0.0.1:{port}/ws", max_msg_size=0) as ws:
                await ws.receive()
                await ws.send_str('{"type":"subscribe","target":"bench"}')
                async for msg in ws:
                    doc = json.loads(msg.data)
                    if doc["type"] == "subscribed":
                        subscribed[0] += 1
                        if subscribed[0] == n:
                            ready.set()
                    elif doc["type"] == "price_update" and not doc.get("snapshot"):
                        now = time.time()
                        if now <= stop_at[0]:
                            tally.events += doc["count"]
                            tally.latencies.append(now - datetime.fromisoformat(doc["data"][0]["timestamp"]).timestamp())

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        await asyncio.wait_for(ready.wait(), 120)
        stop_at[0] = time.time() + seconds + 2  # count what arrives up to 2 s after the last send

        async def write(events: list[Any]) -> None:
            await log.append_events("bench", events)

        sent = await feed(write, walk, seconds, per_batch, every)
        await asyncio.sleep(2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
    finally:
        stop(proc)
        await drop_prefix(client, keys)
        await client.aclose()
    return tally.events / (seconds + 2), tally, sent


async def fanout_socketio(url: str, n: int, seconds: float, per_batch: int, every: float) -> tuple[float, Tally, int]:
    import socketio

    port = free_port()
    channel = f"sio-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "REDIS_URL": url, "SIO_CHANNEL": channel}
    proc = subprocess.Popen([sys.executable, "-m", "bench.edge_baselines.socketio_server", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tally = Tally()
    stop_at = [0.0]
    clients: list[Any] = []
    try:
        await wait_healthy(port, proc)
        sem = asyncio.Semaphore(100)

        async def one() -> None:
            sio = socketio.AsyncClient(reconnection=False)

            @sio.on("price_update")  # type: ignore[misc]
            async def on_price(doc: dict[str, Any]) -> None:
                now = time.time()
                if now <= stop_at[0]:
                    tally.events += doc["count"]
                    tally.latencies.append(now - datetime.fromisoformat(doc["data"][0]["timestamp"]).timestamp())

            async with sem:
                await sio.connect(f"http://127.0.0.1:{port}", transports=["websocket"])
                await sio.call("subscribe", {"target": "bench"})
            clients.append(sio)

        await asyncio.gather(*(one() for _ in range(n)))
        publisher = socketio.AsyncRedisManager(url, channel=channel, write_only=True)
        walk = PriceWalk(default_universe().pick(20), "bench", seed=3)
        stop_at[0] = time.time() + seconds + 2
        from schemas.messages import price_row

        async def write(events: list[Any]) -> None:
            rows = [price_row(f"{int(time.time() * 1000)}-{i}", json.loads(e.model_dump_json()))
                    for i, e in enumerate(events)]
            await publisher.emit("price_update", {"type": "price_update", "data": rows, "count": len(rows),
                                                  "target": "bench"}, room="bench")

        sent = await feed(write, walk, seconds, per_batch, every)
        await asyncio.sleep(2)
        for sio in clients:
            await sio.disconnect()
    finally:
        stop(proc)
    return tally.events / (seconds + 2), tally, sent


async def fanout(url: str, n: int, seconds: float, per_batch: int) -> None:
    every = 0.05  # a batch every 50 ms: per_batch * 20 events/s into the stream, n deliveries each
    ours, t_ours, sent = await fanout_ours(url, n, seconds, per_batch, every)
    base, t_base, _ = await fanout_socketio(url, n, seconds, per_batch, every)
    print(line(f"(a) fan-out, {n:,} clients, {sent / seconds:.0f} ev/s in", ours, "ev/s delivered", base,
               "python-socketio + Redis manager"))
    for name, t in (("ours", t_ours), ("socketio", t_base)):
        print(f"    {name:<9} p50 {percentile(t.latencies, 0.5) * 1000:8.1f} ms   "
              f"p99 {percentile(t.latencies, 0.99) * 1000:8.1f} ms   ({t.events:,} deliveries counted)")


async def main(args: argparse.Namespace) -> None:
    raise_fd_limit()
    with redis_url() as url:
        print(f"bench/edge  {time.strftime('%Y-%m-%d %H:%M')}")
        if args.what in ("resume", "all"):
            await resume(url, args.missed)
        if args.what in ("idle", "all"):
            await idle(url, args.idle)
        if args.what in ("fanout", "all"):
            await fanout(url, args.clients, args.seconds, args.per_batch)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.edge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["fanout", "idle", "resume", "all"])
    p.add_argument("--clients", type=int, default=1000, help="subscribed clients in (a)")
    p.add_argument("--per-batch", type=int, default=25, help="events per 50 ms batch in (a)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long (a) feeds events")
    p.add_argument("--idle", type=int, default=10_000, help="idle connections in (b)")
    p.add_argument("--missed", type=int, default=10_000, help="missed events replayed in (c)")
    return p


if __name__ == "__main__":
    asyncio.run(main(parser().parse_args()))
