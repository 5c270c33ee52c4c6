"""`tickwave db upgrade`, `tickwave archive`, `tickwave events generate`."""

from __future__ import annotations

import asyncio
import logging

import click
from tqdm import tqdm

from agents.settings import ArchiverSettings, EventsSettings
from streams.settings import CommonSettings
from tickwave.runtime import pick_or_exit, run_until_signalled, serve_metrics, settings_or_exit, universe_or_exit

log = logging.getLogger("tickwave")


def _need(value: str | None, var: str) -> str:
    if not value:
        raise click.UsageError(f"{var} is not set")
    return value


@click.group()
def db() -> None:
    """PostgreSQL schema."""


@db.command()
def upgrade() -> None:
    """Apply pending SQL migrations (safe to run twice, and from two processes at once)."""
    from streams.pg import upgrade as apply

    settings = settings_or_exit(CommonSettings)
    applied = asyncio.run(apply(_need(settings.database_url, "DATABASE_URL")))
    click.echo("applied: " + ", ".join(applied) if applied else "schema is up to date")


@click.command()
def archive() -> None:
    """Copy every strategy stream into PostgreSQL's event_archive until SIGINT/SIGTERM."""
    from agents.archiver import Archiver, ArchiverStats
    from streams.archive import ArchiveStore
    from streams.connection import connect
    from streams.keys import Keys
    from streams.pg import create_pool

    s = settings_or_exit(ArchiverSettings)
    redis_url, database_url = _need(s.redis_url, "REDIS_URL"), _need(s.database_url, "DATABASE_URL")
    group = _need(s.archive_group, "TICKWAVE_ARCHIVE_GROUP")
    serve_metrics(s.archive_metrics_port)

    async def main(stop: asyncio.Event) -> None:
        client = connect(redis_url)
        pool = await create_pool(database_url)
        bar = tqdm(desc="archived", unit="ev", dynamic_ncols=True)

        def progress(st: ArchiverStats) -> None:
            bar.update(st.archived - bar.n)
            bar.set_postfix(rejected=st.rejected)
        archiver = Archiver(
            client, Keys(s.key_prefix), ArchiveStore(pool), group=group, consumer=s.archive_consumer,
            batch=s.archive_batch, claim_idle_ms=s.archive_claim_idle_ms, refresh_s=s.archive_refresh_s,
            on_progress=progress,
        )
        log.info("archiver started", extra={"group": s.archive_group, "consumer": s.archive_consumer})
        try:
            stats = await archiver.run(stop)
        finally:
            bar.close()
            await pool.close()
            await client.aclose()
        log.info("archiver stopped", extra={"archived": stats.archived, "rejected": stats.rejected,
                                            "gaps": stats.gaps, "lost": stats.lost})

    run_until_signalled(main)


@click.group()
def events() -> None:
    """Strategy event streams."""


@events.command()
@click.argument("strategy")
@click.option("--rate", type=float, default=10.0, show_default=True, help="events per second; 0 = as fast as possible")
@click.option("--stocks", type=click.IntRange(1), default=10, show_default=True,
              help="how many stocks of the universe (up to the whole market)")
@click.option("--count", type=click.IntRange(1), default=None, help="stop after this many events")
@click.option("--seed", type=int, default=None, help="random seed for a repeatable walk")
def generate(strategy: str, rate: float, stocks: int, count: int | None, seed: int | None) -> None:
    """Write realistic PriceChange events for STRATEGY through append_events."""
    from agents.generator import generate as run
    from streams.connection import connect
    from streams.events import EventLog
    from streams.keys import Keys, check_name

    s = settings_or_exit(EventsSettings)
    redis_url = _need(s.redis_url, "REDIS_URL")
    try:
        check_name(strategy, "strategy")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="STRATEGY") from None
    listings = pick_or_exit(universe_or_exit(s), stocks)

    async def main(stop: asyncio.Event) -> int:
        client = connect(redis_url)
        log_ = EventLog(client, Keys(s.key_prefix), retention_ms=s.event_retention_ms, maxlen=s.event_maxlen,
                        archive_group=s.archive_group, hold_max_bytes=s.event_hold_max_bytes)
        with tqdm(total=count, desc=f"events {strategy}", unit="ev", dynamic_ncols=True) as bar:
            try:
                return await run(log_, strategy, listings=listings, rate=rate, count=count, stop=stop,
                                 seed=seed, on_progress=bar.update)
            finally:
                await client.aclose()

    written = run_until_signalled(main)
    click.echo(f"wrote {written} events to {strategy}")
