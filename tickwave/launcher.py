"""`tickwave run`: the whole pipeline on one machine, for a first look.

Uses REDIS_URL / DATABASE_URL when set, otherwise starts embedded servers;
seeds demo signals for a strategy in PostgreSQL, and runs the simulator source,
the signals relay, the archiver and the edge in this process and the faust join
worker (`tickwave worker`) as a child process; prints the page's address and a
live count. Strategy events are the join's: ticks of signalled stocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any
from datetime import date
from pathlib import Path

from aiohttp import web

from agents.archiver import Archiver
from agents.ingest import IngestStats, run_ingest
from agents.relay import Relay
from agents.sources.simulator import Simulator
from edge.app import create_app
from edge.settings import EdgeSettings
from edge.state import state_key
from schemas.events import Signal
from schemas.universe import Listing, Universe, default_universe
from streams.archive import ArchiveStore
from streams.connection import connect
from streams.errors import StreamsError
from streams.events import EventLog
from streams.keys import Keys
from streams.pg import create_pool, upgrade
from streams.signals import SignalStore
from tickwave import servers

log = logging.getLogger("tickwave.run")


@dataclass
class RunOptions:
    strategy: str = "volume_wave"
    listings: list[Listing] = field(default_factory=lambda: default_universe().pick(20))
    universe: Universe = field(default_factory=default_universe)
    signalled: float = 0.5  # share of the simulated stocks given a demo signal
    interval: float = 1.0
    duration: float | None = None


class Counts:
    ticks = 0
    events = 0
    archived = 0


async def run_pipeline(settings: EdgeSettings, options: RunOptions, stop: asyncio.Event) -> Counts:
    counts = Counts()
    embedded: list[servers.EmbeddedRedis | servers.EmbeddedPostgres] = []
    redis_url, database_url = settings.redis_url, settings.database_url
    try:
        if not redis_url:
            server = await asyncio.to_thread(servers.start_redis)
            embedded.append(server)
            redis_url = server.url
            log.info("embedded redis", extra={"url": redis_url})
        if not database_url:
            try:
                pg = await asyncio.to_thread(servers.start_postgres)
                embedded.append(pg)
                database_url = pg.url
            except servers.EmbeddedServerError as exc:
                log.warning("no PostgreSQL: running without the archive", extra={"error": str(exc)})
        if database_url:
            await upgrade(database_url)
        settings = settings.model_copy(update={"redis_url": redis_url, "database_url": database_url})
        await _run(settings, options, stop, counts)
    finally:
        for running in reversed(embedded):
            await asyncio.to_thread(running.stop)
    return counts


def demo_signals(strategy: str, listings: list[Listing], share: float) -> list[Signal]:
    """Buy signals on every other simulated stock (by `share`), dated today, at the previous close."""
    step = max(1, round(1 / share)) if share > 0 else len(listings) + 1
    return [Signal(strategy=strategy, ts_code=listing.ts_code, name=listing.name, signal_date=date.today(),
                   signal_price=listing.pre_close, confidence=0.8, reason="tickwave run demo")
            for listing in listings[::step] if listing.pre_close]


def start_worker(settings: EdgeSettings, logfile: Path) -> subprocess.Popen[bytes]:
    """The join as its own process, as in production: `tickwave worker` (faust owns its loop)."""
    env = {**os.environ, "REDIS_URL": settings.redis_url or "", "TICKWAVE_KEY_PREFIX": settings.key_prefix,
           "TICKWAVE_TICK_PARTITIONS": str(settings.tick_partitions),
           # without PostgreSQL no archiver runs here: nothing may hold the streams' retention
           "TICKWAVE_ARCHIVE_GROUP": settings.archive_group if settings.database_url else "",
           "TICKWAVE_WORKER_METRICS_PORT": os.environ.get("TICKWAVE_WORKER_METRICS_PORT", "0"),
           # the demo simulator ignores the exchange's clock: bars for every minute, at any hour
           "TICKWAVE_KLINE_SESSIONS": os.environ.get("TICKWAVE_KLINE_SESSIONS", "always")}
    with open(logfile, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "tickwave", "worker"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


async def stop_worker(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)


async def _event_count(events: EventLog, strategy: str, last: int) -> int:
    try:
        return await events.length(strategy)
    except StreamsError:
        return last  # Redis away for a moment: the count line keeps the last figure


async def _run(settings: EdgeSettings, options: RunOptions, stop: asyncio.Event, counts: Counts) -> None:
    assert settings.redis_url
    client = connect(settings.redis_url)
    keys = Keys(settings.key_prefix)
    pool = await create_pool(settings.database_url) if settings.database_url else None
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=settings.edge_shutdown_s)
    await runner.setup()
    site = web.TCPSite(runner, settings.edge_host, settings.edge_port)
    await site.start()
    host = "127.0.0.1" if settings.edge_host in ("0.0.0.0", "::") else settings.edge_host
    print(f"tickwave is running: open http://{host}:{settings.edge_port}/  (Ctrl-C to stop)", flush=True)

    def on_ticks(stats: IngestStats) -> None:
        counts.ticks = stats.appended

    events = EventLog(client, keys)
    tasks: list[asyncio.Task[Any]] = [
        asyncio.create_task(run_ingest(client, keys, Simulator(options.listings, interval=options.interval,
                                                               ignore_clock=True),
                                       stop=stop, partitions=settings.tick_partitions, universe=options.universe,
                                       on_progress=on_ticks)),
    ]
    if pool is not None and settings.database_url:
        signals = demo_signals(options.strategy, options.listings, options.signalled)
        result = await SignalStore(pool).import_signals(signals)
        log.info("demo signals", extra={"strategy": options.strategy, "signals": len(signals),
                                        "changed": result.added + result.updated})
        tasks.append(asyncio.create_task(Relay(client, keys, settings.database_url,
                                               tick_partitions=settings.tick_partitions, poll_s=0.5).run(stop)))
        archiver = Archiver(client, keys, ArchiveStore(pool), group=settings.archive_group or "archiver",
                            consumer="run", refresh_s=1.0)
        archiver.on_progress = lambda st: setattr(counts, "archived", st.archived)
        tasks.append(asyncio.create_task(archiver.run(stop)))
    else:
        log.warning("no PostgreSQL: no signals, so the join has nothing to turn into events")
    logfile = Path(tempfile.gettempdir()) / f"tickwave-run-worker-{os.getpid()}.log"
    worker = start_worker(settings, logfile)
    print(f"join worker: pid {worker.pid}, log {logfile}", flush=True)
    started = time.monotonic()
    tty = sys.stdout.isatty()
    try:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            clients = len(app[state_key].sessions)
            counts.events = await _event_count(events, options.strategy, counts.events)
            line = (f"ticks {counts.ticks:>8,}  events {counts.events:>8,}  archived {counts.archived:>8,}  "
                    f"clients {clients:>3}")
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            if options.duration and time.monotonic() - started >= options.duration:
                stop.set()
            for task in tasks:
                if task.done() and task.exception():
                    raise task.exception()  # type: ignore[misc]
            if worker.poll() is not None:
                raise RuntimeError(f"the join worker exited with {worker.returncode}; see {logfile}")
    finally:
        stop.set()
        if tty:
            print()
        await stop_worker(worker)
        await asyncio.gather(*tasks, return_exceptions=True)
        counts.events = await _event_count(events, options.strategy, counts.events)
        await runner.cleanup()
        if pool is not None:
            await pool.close()
        await client.aclose()
