"""`tickwave run`: everything in one process."""

from __future__ import annotations

import asyncio

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
def run(strategy: str, stocks: int, signalled: float, interval: float, port: int | None, duration: float | None) -> None:
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

    run_until_signalled(main)
