"""`tickwave run`: the whole pipeline in one process, for a first look on any machine.

Uses REDIS_URL / DATABASE_URL when set, otherwise starts embedded servers;
seeds a demo strategy, runs the simulator source, the event writer, the
archiver and the edge, and prints the page's address and a live count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field

from aiohttp import web

from agents.archiver import Archiver
from agents.generator import generate
from agents.ingest import IngestStats, run_ingest
from agents.sources.simulator import Simulator
from edge.app import create_app
from edge.settings import EdgeSettings
from edge.state import state_key
from schemas.universe import Listing, Universe, default_universe
from streams.archive import ArchiveStore
from streams.connection import connect
from streams.events import EventLog
from streams.keys import Keys
from streams.pg import create_pool, upgrade
from tickwave import servers

log = logging.getLogger("tickwave.run")


@dataclass
class RunOptions:
    strategy: str = "volume_wave"
    listings: list[Listing] = field(default_factory=lambda: default_universe().pick(20))
    universe: Universe = field(default_factory=default_universe)
    rate: float = 20.0
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


async def _run(settings: EdgeSettings, options: RunOptions, stop: asyncio.Event, counts: Counts) -> None:
    assert settings.redis_url
    client = connect(settings.redis_url)
    keys = Keys(settings.key_prefix)
    pool = await create_pool(settings.database_url) if settings.database_url else None
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.edge_host, settings.edge_port)
    await site.start()
    host = "127.0.0.1" if settings.edge_host in ("0.0.0.0", "::") else settings.edge_host
    print(f"tickwave is running: open http://{host}:{settings.edge_port}/  (Ctrl-C to stop)", flush=True)

    def on_ticks(stats: IngestStats) -> None:
        counts.ticks = stats.appended

    def on_events(n: int) -> None:
        counts.events += n

    tasks = [
        asyncio.create_task(run_ingest(client, keys, Simulator(options.listings, interval=options.interval,
                                                               ignore_clock=True),
                                       stop=stop, partitions=settings.tick_partitions, universe=options.universe,
                                       on_progress=on_ticks)),
        # until the join agent exists, events come from the generator (same append path)
        asyncio.create_task(generate(EventLog(client, keys), options.strategy, listings=options.listings,
                                     rate=options.rate, count=None, stop=stop, on_progress=on_events)),
    ]
    if pool is not None:
        archiver = Archiver(client, keys, ArchiveStore(pool), consumer="run", refresh_s=1.0)
        archiver.on_progress = lambda st: setattr(counts, "archived", st.archived)
        tasks.append(asyncio.create_task(archiver.run(stop)))
    started = time.monotonic()
    tty = sys.stdout.isatty()
    try:
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            clients = len(app[state_key].sessions)
            line = (f"ticks {counts.ticks:>8,}  events {counts.events:>8,}  archived {counts.archived:>8,}  "
                    f"clients {clients:>3}")
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            if options.duration and time.monotonic() - started >= options.duration:
                stop.set()
            for task in tasks:
                if task.done() and task.exception():
                    raise task.exception()  # type: ignore[misc]
    finally:
        stop.set()
        if tty:
            print()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
        if pool is not None:
            await pool.close()
        await client.aclose()
