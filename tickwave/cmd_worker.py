"""`tickwave worker`: a faust worker running the join (agents/worker.py)."""

from __future__ import annotations

import asyncio

import click

from agents.settings import WorkerSettings
from tickwave.runtime import serve_metrics, settings_or_exit


@click.command()
def worker() -> None:
    """Join ticks with signals into strategy events (a faust worker; run several to share partitions)."""
    import faust

    from agents.worker import build_app, stored_partitions
    from streams.connection import connect
    from streams.keys import Keys

    s = settings_or_exit(WorkerSettings)
    if not s.redis_url:
        raise click.UsageError("REDIS_URL is not set")

    async def partitions() -> int:
        client = connect(s.redis_url or "")
        try:
            return await stored_partitions(client, Keys(s.key_prefix), s.tick_partitions)
        finally:
            await client.aclose()

    count = asyncio.run(partitions())
    app = build_app(s, count)
    serve_metrics(s.worker_metrics_port)
    click.echo(f"tickwave worker: app {s.worker_app_id}, {count} partitions, metrics :{s.worker_metrics_port}",
               err=True)
    # -l info, not warn: at warn faust's terminal spinner lowers the root logger to DEBUG
    # (see bench/driver.py); override_logging=False keeps tickwave's log lines
    faust.Worker(app, loglevel=s.log_level.lower() if s.log_level != "WARNING" else "info",
                 override_logging=False).execute_from_commandline()
