"""`tickwave universe fetch` and `tickwave universe show`."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path

import click

from agents.settings import TushareSettings
from schemas.market import SHANGHAI, Board, NO_LIMIT, limit_band
from schemas.universe import BadUniverseFile, Universe, load_universe, save_universe
from streams.settings import CommonSettings
from tickwave.runtime import settings_or_exit, universe_or_exit


@click.group()
def universe() -> None:
    """The stock universe: the built-in whole market, or a file from Tushare or your own."""


def _progress(line: str) -> None:
    click.echo(line, err=True)


@universe.command()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("universe.csv"),
              show_default=True, help="file to write: Parquet for .parquet, otherwise CSV")
@click.option("--prices/--no-prices", default=True, show_default=True,
              help="previous closes from Tushare's daily (one more call)")
def fetch(out: Path, prices: bool) -> None:
    """Write every listed A-share from Tushare's stock_basic (needs TICKWAVE_TUSHARE_TOKEN)."""
    from agents.stock_basic import TushareApiError, fetch_universe

    s = settings_or_exit(TushareSettings)
    if not s.tushare_token:
        raise click.UsageError("TICKWAVE_TUSHARE_TOKEN is not set: Tushare's stock_basic needs a Pro token "
                               "(without one, the built-in universe covers the whole market)")
    try:
        fetched = fetch_universe(s.tushare_token, today=datetime.now(SHANGHAI).date(), prices=prices,
                                 progress=_progress)
    except TushareApiError as exc:
        raise click.ClickException(str(exc)) from None
    if not len(fetched):
        raise click.ClickException("stock_basic answered with no listings; nothing written")
    save_universe(fetched, out)
    _progress(f"wrote {len(fetched)} listings to {out} ({_summary(fetched)})")
    _progress(f"use it with TICKWAVE_UNIVERSE_FILE={out}")


def _summary(u: Universe) -> str:
    counts = u.board_counts()
    priced = sum(x.pre_close is not None for x in u)
    return (", ".join(f"{board.value} {counts[board]}" for board in Board)
            + f"; ST {sum(x.st for x in u)}; with a previous close {priced}")


def _free_today(u: Universe, today: date) -> list[str]:
    return [x.ts_code for x in u if x.list_date and x.pre_close
            and limit_band(x.ts_code, x.name, x.pre_close, today, list_date=x.list_date) == NO_LIMIT]


@universe.command()
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
def show(file: Path | None) -> None:
    """Check and summarise FILE (default: TICKWAVE_UNIVERSE_FILE, else the built-in universe)."""
    if file is not None:
        try:
            u = load_universe(file)
        except BadUniverseFile as exc:
            raise click.UsageError(str(exc)) from None
    else:
        u = universe_or_exit(settings_or_exit(CommonSettings))
    today = datetime.now(SHANGHAI).date()
    click.echo(f"{u.source}: {len(u)} listings ({_summary(u)})")
    free = _free_today(u, today)
    click.echo(f"new listings without a limit band on {today}: {', '.join(free) if free else 'none'}")
