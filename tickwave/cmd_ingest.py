"""`tickwave ingest`: one source into the ticks topic, with a progress line."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click
from tqdm import tqdm

from agents.settings import IngestSettings
from tickwave.runtime import pick_or_exit, run_until_signalled, serve_metrics, settings_or_exit, universe_or_exit

log = logging.getLogger("tickwave.ingest")


@click.command()
@click.option("--source", "source_name", type=click.Choice(["sim", "file", "tushare"]), default="sim",
              show_default=True)
@click.option("--codes", default=None, help="comma-separated ts_codes for --source tushare "
              "(default TICKWAVE_TUSHARE_CODES)")
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV or Parquet of ticks (--source file)")
@click.option("--speed", type=float, default=0.0, show_default=True,
              help="file replay at N× real time; 0 = as fast as possible")
@click.option("--stocks", type=click.IntRange(1), default=20, show_default=True,
              help="simulated stocks from the universe (the first 20 are well-known names; up to the whole market)")
@click.option("--interval", type=float, default=3.0, show_default=True, help="simulator seconds between snapshots")
@click.option("--ignore-clock", is_flag=True, help="simulate outside trading hours too (demos)")
@click.option("--seed", type=int, default=None, help="simulator random seed")
def ingest(source_name: str, codes: str | None, path: Path | None, speed: float, stocks: int, interval: float,
           ignore_clock: bool, seed: int | None) -> None:
    """Append ticks from a source to the ticks topic until it ends or SIGINT/SIGTERM."""
    from agents.ingest import run_ingest, summary
    from agents.sources import Source
    from agents.sources.replay import FileReplay
    from agents.sources.simulator import Simulator
    from streams.connection import connect
    from streams.keys import Keys

    s = settings_or_exit(IngestSettings)
    if not s.redis_url:
        raise click.UsageError("REDIS_URL is not set")
    redis_url = s.redis_url
    universe = universe_or_exit(s)
    source: Source
    if source_name == "tushare":
        from agents.sources.tushare import TushareConfigError, TushareSource

        try:
            source = TushareSource([c for c in (codes or s.tushare_codes).split(",") if c.strip()],
                                   token=s.tushare_token, interval=s.tushare_interval)
        except (TushareConfigError, ValueError) as exc:
            raise click.UsageError(str(exc)) from None
    elif source_name == "file":
        if path is None:
            raise click.UsageError("--source file needs --file PATH")
        source = FileReplay(path, speed=speed)
    else:
        source = Simulator(pick_or_exit(universe, stocks), interval=interval, ignore_clock=ignore_clock, seed=seed)
    serve_metrics(s.ingest_metrics_port)

    async def main(stop: asyncio.Event) -> None:
        client = connect(redis_url)
        bar = tqdm(desc=f"ingest {source_name}", unit="tick", dynamic_ncols=True)

        def progress(stats) -> None:  # type: ignore[no-untyped-def]
            bar.update(stats.fetched - bar.n)
            bar.set_postfix(appended=stats.appended, rejected=stats.rejected_total, dup=stats.duplicates)

        try:
            stats = await run_ingest(client, Keys(s.key_prefix), source, stop=stop,
                                     partitions=s.tick_partitions, maxlen=s.tick_maxlen, universe=universe,
                                     on_progress=progress)
        finally:
            bar.close()
            await client.aclose()
        log.info("ingest stopped", extra=dict(summary(stats)))

    run_until_signalled(main)
