"""`tickwave signals add|remove|list|import` and `tickwave relay`."""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import sys
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import click

from agents.settings import RelaySettings
from schemas.market import SHANGHAI
from streams.settings import CommonSettings
from tickwave.runtime import run_until_signalled, serve_metrics, settings_or_exit

log = logging.getLogger("tickwave.relay")
T = TypeVar("T")


@contextmanager
def _clear_errors() -> Iterator[None]:
    """The store's errors as one line and exit 1, never a traceback."""
    from streams.errors import ArchiveUnavailable, BadSignals, SignalNotFound

    try:
        yield
    except (BadSignals, SignalNotFound, ArchiveUnavailable) as exc:
        raise click.ClickException(str(exc)) from None
    except asyncpg.exceptions.UndefinedTableError:
        raise click.ClickException("the signals tables are missing: run `tickwave db upgrade`") from None
    except ValueError as exc:  # a bad strategy name or ts_code
        raise click.BadParameter(str(exc)) from None


def _with_store(work: Callable[[Any], Awaitable[T]]) -> T:
    """Run `work(store)` against DATABASE_URL."""
    from streams.pg import create_pool
    from streams.signals import SignalStore

    s = settings_or_exit(CommonSettings)
    if not s.database_url:
        raise click.UsageError("DATABASE_URL is not set")
    database_url = s.database_url

    async def main() -> T:
        pool = await create_pool(database_url, min_size=1, max_size=1)
        try:
            return await work(SignalStore(pool))
        finally:
            await pool.close()

    with _clear_errors():
        return asyncio.run(main())


@click.group()
def signals() -> None:
    """Strategy signals in PostgreSQL (each change also goes to the outbox the relay reads)."""


@signals.command()
@click.argument("strategy")
@click.argument("ts_code")
@click.option("--date", "signal_date", type=click.DateTime(["%Y-%m-%d", "%Y%m%d"]), default=None,
              help="signal date (default: today in Beijing)")
@click.option("--price", type=float, default=None, help="price when the signal fired (yuan)")
@click.option("--confidence", type=click.FloatRange(0, 1), default=None)
@click.option("--side", type=click.Choice(["buy", "sell"]), default="buy", show_default=True)
@click.option("--name", default="", help="stock name shown to clients")
@click.option("--reason", default="", help="why the strategy signalled")
def add(strategy: str, ts_code: str, signal_date: datetime | None, price: float | None, confidence: float | None,
        side: str, name: str, reason: str) -> None:
    """Add a signal, or replace the strategy's signal on TS_CODE."""
    from schemas.events import Signal

    with _clear_errors():
        signal = Signal(strategy=strategy, ts_code=ts_code, name=name, side=side,  # type: ignore[arg-type]
                        signal_date=signal_date.date() if signal_date else datetime.now(SHANGHAI).date(),
                        signal_price=price, confidence=confidence, reason=reason)
    outcome = _with_store(lambda store: store.add(signal))
    click.echo(f"{outcome} {signal.strategy} {signal.ts_code}")


@signals.command()
@click.argument("strategy")
@click.argument("ts_code")
def remove(strategy: str, ts_code: str) -> None:
    """Remove a strategy's signal on TS_CODE (exit 1 if there is none)."""
    gone = _with_store(lambda store: store.remove(strategy, ts_code))
    click.echo(f"removed {gone.strategy} {gone.ts_code}")


@signals.command(name="list")
@click.argument("strategy", required=False)
@click.option("--side", type=click.Choice(["buy", "sell"]), default=None, help="only this side")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True,
              help="csv is what `signals import` reads")
def list_(strategy: str | None, side: str | None, fmt: str) -> None:
    """The current signals (of STRATEGY), newest signal date first."""
    from streams.signals import CSV_COLUMNS

    found = _with_store(lambda store: store.signals(strategy, side))
    rows: list[dict[str, Any]] = [s.model_dump(mode="json") for s in found]
    if fmt == "json":
        click.echo(json.dumps(rows, ensure_ascii=False, indent=1))
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    else:
        for r in rows:
            price = "" if r["signal_price"] is None else f"{r['signal_price']:.2f}"
            conf = "" if r["confidence"] is None else f"{r['confidence']:.2f}"
            click.echo(f"{r['strategy']:<16} {r['ts_code']:<10} {r['side']:<4} {r['signal_date']} "
                       f"{price:>10} {conf:>5} {r['name']} {r['reason']}".rstrip())
        click.echo(f"{len(rows)} signal(s)", err=True)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("gb18030")  # what Excel on a Chinese Windows saves CSV as


@signals.command(name="import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--strategy", default=None, help="strategy of every row (for a file without a strategy column)")
@click.option("--replace", is_flag=True, help="also remove the signals of the file's strategies that it lacks")
def import_(path: Path, strategy: str | None, replace: bool) -> None:
    """Import signals from a CSV file in one transaction; importing it again changes nothing.

    Columns: strategy, ts_code, name, side, signal_date (YYYY-MM-DD or YYYYMMDD), signal_price,
    confidence, reason; ts_code and signal_date are required, strategy unless --strategy.
    """
    from streams.signals import read_csv

    with _clear_errors():
        wanted = read_csv(_decode(path.read_bytes()), strategy)
    result = _with_store(lambda store: store.import_signals(wanted, replace=replace))
    click.echo(f"imported {path.name}: {result.added} added, {result.updated} updated, "
               f"{result.removed} removed, {result.unchanged} unchanged")


@click.command()
def relay() -> None:
    """Move signal outbox rows to the `signals` topic until SIGINT/SIGTERM (one leads, others wait)."""
    from agents.relay import Relay, RelayError
    from streams.connection import connect
    from streams.keys import Keys

    s = settings_or_exit(RelaySettings)
    if not s.redis_url or not s.database_url:
        raise click.UsageError(f"{'REDIS_URL' if not s.redis_url else 'DATABASE_URL'} is not set")
    redis_url, database_url = s.redis_url, s.database_url
    serve_metrics(s.relay_metrics_port)

    async def main(stop: asyncio.Event) -> None:
        client = connect(redis_url)
        relay_ = Relay(client, Keys(s.key_prefix), database_url, tick_partitions=s.tick_partitions,
                       batch=s.relay_batch, poll_s=s.relay_poll_s, standby_s=s.relay_standby_s)
        log.info("relay started", extra={"batch": s.relay_batch, "poll_s": s.relay_poll_s})
        try:
            stats = await relay_.run(stop)
        except RelayError as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            await client.aclose()
        log.info("relay stopped", extra={"relayed": stats.relayed, "last_id": stats.last_id,
                                         "conflicts": stats.conflicts})

    run_until_signalled(main)

