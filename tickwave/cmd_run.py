"""`tickwave run`: everything in one process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from edge.settings import EdgeSettings
from tickwave.runtime import pick_or_exit, run_until_signalled, settings_or_exit, universe_or_exit


@click.command()
@click.option("--strategy", default="volume_wave", show_default=True, help="demo strategy to fill")
@click.option("--stocks", type=click.IntRange(1), default=20, show_default=True,
              help="simulated stocks from the universe (up to the whole market)")
@click.option("--signalled", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="share of the simulated stocks given a demo signal for --strategy")
@click.option("--interval", type=float, default=1.0, show_default=True, help="simulator seconds between snapshots")
@click.option("--port", type=int, default=None, help="edge port (default TICKWAVE_EDGE_PORT or 8000)")
@click.option("--duration", type=float, default=None, help="stop after this many seconds (smoke tests)")
@click.option("--cluster", is_flag=True,
              help="on a local Redis Cluster (3 masters + 3 replicas), each service its own process: ingest, "
                   "relay, two workers, archiver, two edge nodes (REDIS_URL is not used)")
@click.option("--dir", "workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="with --cluster: where the cluster's nodes and the processes' logs go (default a new temp dir)")
def run(strategy: str, stocks: int, signalled: float, interval: float, port: int | None, duration: float | None,
        cluster: bool, workdir: Path | None) -> None:
    """Run the whole pipeline (ingest, relay, join worker, archiver, edge) with demo signals:
    embedded servers unless REDIS_URL / DATABASE_URL are set."""
    from tickwave.launcher import RunOptions, run_pipeline

    settings = settings_or_exit(EdgeSettings)
    if port is not None:
        settings = settings.model_copy(update={"edge_port": port})
    universe = universe_or_exit(settings)
    options = RunOptions(strategy=strategy, listings=pick_or_exit(universe, stocks), universe=universe, signalled=signalled,
                         interval=interval, duration=duration)

    async def main(stop: asyncio.Event) -> None:
        counts = await run_pipeline(settings, options, stop)
        click.echo(f"stopped: {counts.ticks} ticks, {counts.events} events, {counts.archived} archived")

    async def main_cluster(stop: asyncio.Event) -> None:
        from tickwave.cluster_run import run_cluster

        counts, codes = await run_cluster(settings, options, stop, workdir)
        click.echo(f"stopped: {counts.events} events; exit codes "
                   + ", ".join(f"{name} {code}" for name, code in codes.items()))
        if any(codes.values()):
            raise SystemExit(1)

    run_until_signalled(main_cluster if cluster else main)
