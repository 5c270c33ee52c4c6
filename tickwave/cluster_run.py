"""`tickwave run --cluster`: the production layout on one machine, for a demo of Redis Cluster.

A local Redis Cluster (three masters, one replica each: tickwave/cluster.py) and every service
as its own process, as in production: ingest (simulator), the signals relay, two join workers,
the archiver and two edge nodes. PostgreSQL is DATABASE_URL's, else an embedded one (the demo
signals live there). Logs and the cluster's directories go under one work directory; stopping
(Ctrl-C, SIGTERM or --duration) ends the processes, then the cluster.
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
from pathlib import Path

from edge.settings import EdgeSettings
from streams.connection import connect
from streams.errors import StreamsError
from streams.events import EventLog
from streams.keys import Keys
from streams.pg import create_pool, upgrade
from streams.signals import SignalStore
from tickwave import cluster as local_cluster
from tickwave import servers
from tickwave.launcher import Counts, RunOptions, demo_signals

log = logging.getLogger("tickwave.run")

#: the processes of the layout: name -> `tickwave` arguments (ingest's are added at start)
LAYOUT = {"relay": ["relay"], "worker-a": ["worker"], "worker-b": ["worker"], "archive": ["archive"],
          "edge-a": ["edge"], "edge-b": ["edge"]}


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    logfile: Path


@dataclass
class ClusterRun:
    """The running layout (what the demo prints and stops)."""

    workdir: Path
    children: list[Child] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        logfile = self.workdir / f"{name}.log"
        with open(logfile, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "tickwave", *argv], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        child = Child(name, proc, logfile)
        self.children.append(child)
        return child

    def dead(self) -> list[Child]:
        return [c for c in self.children if c.proc.poll() is not None]

    async def stop(self, grace: float = 15.0) -> dict[str, int]:
        """SIGTERM every process (ingest first, so the rest drain what it wrote), then wait;
        kill what outlives `grace`. Returns each one's exit code."""
        for child in sorted(self.children, key=lambda c: c.name != "ingest"):
            if child.proc.poll() is None:
                child.proc.terminate()
        codes = {}
        for child in self.children:
            try:
                codes[child.name] = await asyncio.to_thread(child.proc.wait, grace)
            except subprocess.TimeoutExpired:
                child.proc.kill()
                codes[child.name] = await asyncio.to_thread(child.proc.wait)
        return codes


def child_env(settings: EdgeSettings, redis_url: str, database_url: str) -> dict[str, str]:
    """What every process of the layout shares; metrics on free ports (0) so two of a kind fit."""
    return {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url,
            "TICKWAVE_KEY_PREFIX": settings.key_prefix, "TICKWAVE_TICK_PARTITIONS": str(settings.tick_partitions),
            "TICKWAVE_INGEST_METRICS_PORT": "0", "TICKWAVE_WORKER_METRICS_PORT": "0",
            "TICKWAVE_RELAY_METRICS_PORT": "0", "TICKWAVE_ARCHIVE_METRICS_PORT": "0",
            "TICKWAVE_EDGE_HOST": settings.edge_host,
            # every master has a replica here: WAIT for it after each event append (docs/operations.md)
            "TICKWAVE_WORKER_REPLICA_WAIT_MS": os.environ.get("TICKWAVE_WORKER_REPLICA_WAIT_MS", "50")}


async def run_cluster(settings: EdgeSettings, options: RunOptions, stop: asyncio.Event,
                      workdir: Path | None = None) -> tuple[Counts, dict[str, int]]:
    """Start the cluster and the layout, print where to look, count until `stop`, stop it all.
    Returns the counts and each process's exit code."""
    counts = Counts()
    codes: dict[str, int] = {}
    workdir = workdir or Path(tempfile.mkdtemp(prefix="tickwave-cluster-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pg: servers.EmbeddedPostgres | None = None
    c = local_cluster.LocalCluster(local_cluster.binary(), workdir / "redis")
    await asyncio.to_thread(c.start)
    run = ClusterRun(workdir)
    client = None
    try:
        database_url = settings.database_url
        if not database_url:
            pg = await asyncio.to_thread(servers.start_postgres)
            database_url = pg.url
        await upgrade(database_url)
        pool = await create_pool(database_url)
        try:
            await SignalStore(pool).import_signals(demo_signals(options.strategy, options.listings, options.signalled))
        finally:
            await pool.close()
        env = child_env(settings, c.url, database_url)
        ports = [settings.edge_port, servers.free_port()]
        for name, argv in LAYOUT.items():
            extra = {}
            if name.startswith("edge"):
                extra = {"TICKWAVE_EDGE_PORT": str(ports[name == "edge-b"]), "TICKWAVE_EDGE_NODE": name}
            run.spawn(name, argv, {**env, **extra})
        run.spawn("ingest", ["ingest", "--source", "sim", "--stocks", str(len(options.listings)),
                             "--interval", str(options.interval), "--ignore-clock"], env)
        host = "127.0.0.1" if settings.edge_host in ("0.0.0.0", "::") else settings.edge_host
        print(f"tickwave is running on a Redis Cluster ({c.url}): open http://{host}:{ports[0]}/ or "
              f"http://{host}:{ports[1]}/  (Ctrl-C to stop)", flush=True)
        print(f"processes: {', '.join(f'{ch.name} {ch.proc.pid}' for ch in run.children)}; logs in {workdir}",
              flush=True)
        client = connect(c.url)
        events = EventLog(client, Keys(settings.key_prefix))
        started = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            with contextlib.suppress(StreamsError):  # a failover under way: keep the last figure
                counts.events = await events.length(options.strategy)
            print(f"events {counts.events:>8,}", flush=True)
            if options.duration and time.monotonic() - started >= options.duration:
                stop.set()
            if dead := run.dead():
                raise RuntimeError(f"{dead[0].name} exited with {dead[0].proc.returncode}; see {dead[0].logfile}")
    finally:
        codes = await run.stop()
        if client is not None:
            with contextlib.suppress(StreamsError):
                counts.events = await EventLog(client, Keys(settings.key_prefix)).length(options.strategy)
            await client.aclose()
        await asyncio.to_thread(c.stop)
        if pg is not None:
            await asyncio.to_thread(pg.stop)
        unclean = {n: code for n, code in codes.items() if code != 0}
        if unclean:
            log.warning("processes that did not stop cleanly", extra={"exit_codes": unclean})
    return counts, codes
