"""bench/edge: (a) fan-out to 1,000 clients beside python-socketio with its Redis manager,
(b) memory per idle connection beside a bare aiohttp WebSocket server, (c) resume of
10,000 missed events beside a raw XRANGE of them. Loopback only, bounded in time.

    python -m bench.edge [fanout|idle|resume|all] [--clients 1000] [--client-procs 2] [--rate 100]
                         [--per-append 1] [--edge-workers 1] [--seconds 10] [--idle 10000] [--missed 10000]

(a) runs its clients in --client-procs processes of their own (bench/pipeline_clients.py: picows,
the same clients for both servers, speaking each one's protocol) and appends --rate events/s for
--seconds; latency runs from each event's append (its Redis entry time; python-socketio's: when
the bench published it) to its frame's arrival, and every client's deliveries are checked
against the exact events published (lost, duplicated), with the close codes the server sent and
the CPU of every process. The delivered rate is deliveries counted (up to 2 s after the last
event) over --seconds. Needs the `bench` extra (python-socketio, picows).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from agents.generator import PriceWalk
from schemas.universe import default_universe
from bench._common import CpuMeter, drop_prefix, fresh_keys, line, redis_url
from bench.pipeline_clients import SOCKETIO, TICKWAVE, Delivered, Fleet
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


def start_edge(url: str, keys: Keys, port: int, log: Path | None = None, workers: int = 1,
               **env: str) -> subprocess.Popen[bytes]:
    """`tickwave edge` on `port` (`--workers N` processes), logging warnings to `log` (else nowhere)."""
    full = {**os.environ, "REDIS_URL": url, "TICKWAVE_KEY_PREFIX": keys.prefix, "TICKWAVE_EDGE_PORT": str(port),
            "TICKWAVE_EDGE_HOST": "127.0.0.1", "TICKWAVE_EDGE_NODE": f"bench-{uuid.uuid4().hex[:6]}",
            "TICKWAVE_EDGE_MAX_CONNECTIONS_PER_IP": "100000", "TICKWAVE_LOG_LEVEL": "WARNING", **env}
    full.pop("DATABASE_URL", None)
    argv = [sys.executable, "-m", "tickwave", "edge"] + (["--workers", str(workers)] if workers > 1 else [])
    if log is None:
        return subprocess.Popen(argv, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env=full, stdout=out, stderr=subprocess.STDOUT)


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

SETTLE_S = 2.0  # after the last event, frames still on their way count; later ones are lost


@dataclass
class Fanout:
    """One server's fan-out run: what it was fed and what the clients saw."""

    sent: int
    owed: int
    got: Delivered
    meter: CpuMeter
    load: tuple[float, float]  # 1-minute load average before and after

    def rate(self, seconds: float) -> float:
        return self.got.delivered / seconds

    def p99(self) -> float:
        return percentile(self.got.ordered(), 0.99)

    def summary(self) -> str:
        g = self.got
        return (f"p50 {percentile(g.ordered(), 0.5):8.1f} ms   p99 {self.p99():8.1f} ms   "
                f"max {g.ordered()[-1] if g.ordered() else float('nan'):8.1f} ms   "
                f"({g.delivered:,} deliveries counted of {self.owed:,}, {g.lost:,} lost (not in by {SETTLE_S:g} s after the last), "
                f"{g.duplicated:,} duplicated; closed by the server: {g.closes()})")

    def us_per_delivery(self) -> float:
        """CPU of the server's processes per delivery: steadier than latency on a shared machine."""
        used = sum(v for k, v in self.meter.used.items() if k.startswith(("edge", "socketio")))
        return used / self.got.delivered * 1e6 if self.got.delivered else float("nan")

    def cpu(self) -> str:
        return (f"{self.meter.text()}; {self.us_per_delivery():.1f} µs of server CPU per delivery; "
                f"load average {self.load[0]:.2f} -> {self.load[1]:.2f}")


async def paced_feed(publish: Callable[[list[Any]], Awaitable[dict[str, float]]], walk: PriceWalk, seconds: float,
                     rate: float, per_append: int) -> dict[str, float]:
    """`rate` events/s for `seconds`, `per_append` at a time (late appends catch up); returns every
    event id published with the time latency is measured from."""
    every = per_append / rate
    published: dict[str, float] = {}
    total = int(rate * seconds)
    start = next_at = time.monotonic()
    while len(published) < total:
        due = min(total, int(rate * (time.monotonic() - start)) + per_append)
        if due > len(published):
            published.update(await publish([walk.next_event() for _ in range(due - len(published))]))
        next_at += every
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    return published


async def fanout_run(url: str, server: str, n: int, procs: int, seconds: float, rate: float, per_append: int,
                     edge_workers: int) -> Fanout:
    """`server` is "tickwave" or "socketio": the same picows clients (bench/pipeline_clients.py),
    the same pacing and the same count against the exact events published."""
    keys = fresh_keys()
    client = connect(url)
    port = free_port()
    walk = PriceWalk(default_universe().pick(20), "bench", seed=3)
    fleet: Fleet | None = None
    publisher: Any = None
    if server == TICKWAVE:
        log = EventLog(client, keys)
        await log.append_events("bench", [walk.next_event()])  # only a strategy with events is subscribable
        proc = start_edge(url, keys, port, workers=edge_workers)
        ws_url = f"ws://127.0.0.1:{port}/ws"

        async def publish(events: list[Any]) -> dict[str, float]:
            # latency from the append: the entry id's time is Redis's clock when it appended
            return {i: float(i.split("-", 1)[0]) for i in await log.append_events("bench", events)}
    else:
        import socketio

        from schemas.messages import price_row

        channel = f"sio-{uuid.uuid4().hex[:6]}"
        proc = subprocess.Popen([sys.executable, "-m", "bench.edge_baselines.socketio_server", str(port)],
                                env={**os.environ, "REDIS_URL": url, "SIO_CHANNEL": channel},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ws_url = f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"
        publisher = socketio.AsyncRedisManager(url, channel=channel, write_only=True)
        made = [0]

        async def publish(events: list[Any]) -> dict[str, float]:
            ms = time.time() * 1000
            rows = []
            for e in events:
                made[0] += 1
                rows.append(price_row(f"{int(ms)}-{made[0]}", orjson.loads(e.model_dump_json())))
            await publisher.emit("price_update", {"type": "price_update", "data": rows, "count": len(rows),
                                                  "target": "bench"}, room="bench")
            return {r["event_id"]: ms for r in rows}
    try:
        await wait_healthy(port, proc)
        fleet = Fleet(ws_url, ["bench"] * n, procs, server)
        await fleet.ready()
        pids = {"edge" if server == TICKWAVE else "socketio": proc.pid, **fleet.pids(),
                **{f"edge {i + 1}": pid for i, pid in enumerate(children(proc.pid))}}
        load0 = os.getloadavg()[0]
        async with CpuMeter(client, pids) as meter:
            published = await paced_feed(publish, walk, seconds, rate, per_append)
            await asyncio.sleep(SETTLE_S)
        got = (await fleet.report([{"bench": published}]))[0]
        return Fanout(len(published), len(published) * n, got, meter, (load0, os.getloadavg()[0]))
    finally:
        if fleet is not None:
            fleet.close()
        stop(proc)
        await drop_prefix(client, keys)
        await client.aclose()


def children(pid: int) -> list[int]:
    """The processes `pid` started (`tickwave edge --workers N`'s edge processes)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


async def fanout(url: str, n: int, procs: int, seconds: float, rate: float, per_append: int,
                 edge_workers: int) -> None:
    ours = await fanout_run(url, TICKWAVE, n, procs, seconds, rate, per_append, edge_workers)
    base = await fanout_run(url, SOCKETIO, n, procs, seconds, rate, per_append, 1)
    workers = f", {edge_workers} edge processes" if edge_workers > 1 else ""
    print(line(f"(a) fan-out, {n:,} clients, {rate:,.0f} ev/s in{workers}", ours.rate(seconds), "deliveries/s",
               base.rate(seconds), "python-socketio + Redis manager"))
    print(line(f"(a) append -> frame p99, {n:,} clients, {rate:,.0f} ev/s", ours.p99(), "ms", base.p99(),
               "python-socketio + Redis manager"))
    for name, run in (("ours", ours), ("socketio", base)):
        print(f"    {name:<9} {run.summary()}")
        print(f"    {'':<9} {run.cpu()}")


async def main(args: argparse.Namespace) -> None:
    raise_fd_limit()
    with redis_url() as url:
        print(f"bench/edge  {time.strftime('%Y-%m-%d %H:%M')}")
        if args.what in ("resume", "all"):
            await resume(url, args.missed)
        if args.what in ("idle", "all"):
            await idle(url, args.idle)
        if args.what in ("fanout", "all"):
            await fanout(url, args.clients, args.client_procs, args.seconds, args.rate, args.per_append,
                         args.edge_workers)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.edge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["fanout", "idle", "resume", "all"])
    p.add_argument("--clients", type=int, default=1000, help="subscribed clients in (a)")
    p.add_argument("--client-procs", type=int, default=2, help="processes the clients of (a) run in")
    p.add_argument("--rate", type=float, default=100.0, help="events/s into the stream in (a)")
    p.add_argument("--per-append", type=int, default=1, help="events per append in (a) (one append every "
                                                                "per-append/rate seconds)")
    p.add_argument("--edge-workers", type=int, default=1, help="edge processes on the one port in (a)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long (a) feeds events")
    p.add_argument("--idle", type=int, default=10_000, help="idle connections in (b)")
    p.add_argument("--missed", type=int, default=10_000, help="missed events replayed in (c)")
    return p


if __name__ == "__main__":
    asyncio.run(main(parser().parse_args()))
