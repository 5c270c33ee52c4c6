"""`tickwave tail` (live events from an edge, resumable) and `tickwave export` (history into a file)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from streams.settings import CommonSettings
from tickwave.runtime import run_until_signalled, settings_or_exit

# a range or resume history cannot cover: distinct from usage errors (2) and failures (1)
EXIT_NOT_COVERED = 3
PAGE = 5000  # events per history read and Parquet row group: a few MB in memory


class NotCovered(click.ClickException):
    exit_code = EXIT_NOT_COVERED


# --- tail ------------------------------------------------------------------------------

def _line(event: Any) -> str:
    from tickwave.client import PriceEvent

    if isinstance(event, PriceEvent):
        i = event.item
        since = "" if i.change_since_signal_percent is None else f" {i.change_since_signal_percent:+.2f}%"
        return (f"{event.event_id} {i.timestamp.strftime('%H:%M:%S')} {i.ts_code} {i.name} {i.price:.2f} "
                f"{i.change_percent:+.2f}%{since}")
    s = event.change.signal
    price = "" if s.signal_price is None else f" {s.signal_price:.2f}"
    return f"{event.event_id} signal {event.change.action} {s.ts_code} {s.name}{price}".rstrip()


def _json(event: Any) -> str:
    from tickwave.client import PriceEvent

    if isinstance(event, PriceEvent):
        doc = {"type": "price", "epoch": event.epoch, **event.item.model_dump(mode="json")}
    else:
        doc = {"type": "signal", "event_id": event.event_id, "epoch": event.epoch,
               **event.change.model_dump(mode="json")}
    return json.dumps(doc, ensure_ascii=False)


class Table:
    """The latest row per stock, redrawn at most every `refresh` seconds."""

    def __init__(self, strategy: str, refresh: float):
        self.strategy, self.refresh = strategy, refresh
        self.rows: dict[str, Any] = {}
        self.status = ""
        self.dirty = False
        self.tty = sys.stdout.isatty()

    def replace(self, rows: Any) -> None:
        self.rows = {r.ts_code: r for r in rows}
        self.dirty = True

    def update(self, event: Any) -> None:
        from tickwave.client import PriceEvent

        if isinstance(event, PriceEvent):
            self.rows[event.item.ts_code] = event.item
        elif event.change.action == "remove":
            self.rows.pop(event.change.signal.ts_code, None)
        self.dirty = True

    def draw(self) -> None:
        if not self.dirty:
            return
        self.dirty = False
        lines = [f"{self.strategy}: {len(self.rows)} stocks  {self.status}".rstrip(),
                 f"{'ts_code':<10} {'name':<10} {'price':>10} {'change':>8} {'signal':>8} {'time':>8}  event_id"]
        for code in sorted(self.rows):
            r = self.rows[code]
            since = "" if r.change_since_signal_percent is None else f"{r.change_since_signal_percent:+.2f}%"
            lines.append(f"{code:<10} {r.name[:10]:<10} {r.price:>10.2f} {r.change_percent:>+7.2f}% {since:>8} "
                         f"{r.timestamp.strftime('%H:%M:%S'):>8}  {r.event_id or ''}")
        head = "\x1b[H\x1b[2J" if self.tty else "\n"
        click.echo(head + "\n".join(lines))

    async def redraw(self) -> None:
        while True:
            await asyncio.sleep(self.refresh)
            self.draw()


@click.command()
@click.argument("strategy")
@click.option("--url", envvar="TICKWAVE_URL", default="http://127.0.0.1:8000", show_default=True,
              help="the edge (or its load balancer); env TICKWAVE_URL")
@click.option("--since", "since", default=None, metavar="EVENT_ID",
              help="start with every event after this id (refused, exit 3, when history no longer has them)")
@click.option("--epoch", default=None, help="the epoch --since comes from (default: the current one)")
@click.option("--format", "fmt", type=click.Choice(["line", "json", "table"]), default="line", show_default=True,
              help="one line per event, one JSON object per event, or a refreshing table of the latest prices")
@click.option("--count", type=click.IntRange(1), default=None, help="stop after this many events")
@click.option("--token", envvar="TICKWAVE_TOKEN", default=None, help="JWT when the edge has auth on; env TICKWAVE_TOKEN")
@click.option("--refresh", type=click.FloatRange(0.05), default=0.5, show_default=True,
              help="seconds between table redraws")
def tail(strategy: str, url: str, since: str | None, epoch: str | None, fmt: str, count: int | None,
         token: str | None, refresh: float) -> None:
    """Print STRATEGY's events as they happen; reconnects and resumes by itself.

    Lines go to stdout (`EVENT_ID TIME TS_CODE NAME PRICE CHANGE% [SINCE_SIGNAL%]`), the
    connection's state to stderr. The last id printed is what --since takes to carry on later."""
    from tickwave.client import (
        ClientError, Disconnected, PriceEvent, Resumed, ResumeLost, SignalEvent, Snapshot, subscribe,
    )

    if epoch and not since:
        raise click.UsageError("--epoch needs --since")
    try:
        sub = subscribe(url, strategy, last_event_id=since, epoch=epoch, token=token)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from None
    table = Table(strategy, refresh) if fmt == "table" else None

    def note(text: str) -> None:
        if table is not None:
            table.status = text
            table.dirty = True
        click.echo(f"tail: {text}", err=True)

    async def main(stop: asyncio.Event) -> int:
        stopper = asyncio.create_task(stop.wait())
        stopper.add_done_callback(lambda _: sub.close())
        drawer = asyncio.create_task(table.redraw()) if table is not None else None
        printed, first = 0, True
        try:
            async for event in sub:
                if isinstance(event, (PriceEvent, SignalEvent)):
                    if table is not None:
                        table.update(event)
                    else:
                        click.echo(_line(event) if fmt == "line" else _json(event))
                    printed += 1
                    if count is not None and printed >= count:
                        break
                elif isinstance(event, Snapshot):
                    note(f"snapshot of {len(event.rows)} stocks; live after {event.event_id} (epoch {event.epoch})")
                    if table is not None:
                        table.replace(event.rows)
                elif isinstance(event, ResumeLost):
                    if first and since:
                        raise NotCovered(
                            f"cannot resume {strategy} after {since}: the edge no longer has those events (the "
                            "stream was recreated, history has a hole, or there are more than it replays); "
                            "`tickwave export` reads what history has")
                    note(f"RESUME LOST after {event.after_id}: events since then are missing; continuing from a "
                         f"snapshot of {len(event.snapshot.rows)} stocks (epoch {event.snapshot.epoch})")
                    if table is not None:
                        table.replace(event.snapshot.rows)
                elif isinstance(event, Resumed):
                    note(f"resumed after {event.after_id}: {event.replayed} events replayed")
                elif isinstance(event, Disconnected):
                    note(f"disconnected ({event.reason}); retrying in {event.retry_in:.1f}s")
                if not isinstance(event, Disconnected):
                    first = False
        except ClientError as exc:
            raise click.ClickException(str(exc)) from None
        finally:
            await sub.aclose()
            stopper.cancel()
            if drawer is not None:
                drawer.cancel()
                table.draw()  # type: ignore[union-attr]
        if sub.last_event_id:
            click.echo(f"tail: last event {sub.last_event_id} (epoch {sub.epoch})", err=True)
        return printed

    run_until_signalled(main)


# --- export ----------------------------------------------------------------------------

@click.command()
@click.argument("strategy")
@click.option("--since", default=None, metavar="ID|TIME",
              help="events after this event id, or at or after this time (ISO, Beijing time unless it has a zone); "
                   "default: the first event")
@click.option("--until", default=None, metavar="ID|TIME",
              help="events up to and including this event id, or before this time; default: the newest event now")
@click.option("--epoch", default=None, help="refuse unless the stream is still this epoch")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet", "ndjson"]), default=None,
              help="default: from --out's suffix (.csv, .parquet, .ndjson)")
@click.option("--out", type=click.Path(dir_okay=False, writable=True, path_type=Path), required=True)
@click.option("--page-size", type=click.IntRange(1, 100_000), default=PAGE, show_default=True,
              help="events read from history per call (and per Parquet row group)")
def export(strategy: str, since: str | None, until: str | None, epoch: str | None, fmt: str | None,
           out: Path, page_size: int) -> None:
    """Write STRATEGY's history (Redis, then the PostgreSQL archive) to a file, or refuse with
    exit code 3 and no file when history has a hole in the range.

    csv and parquet hold the price events, one row each (columns and types in docs/operations.md);
    ndjson holds every event, signal changes too."""
    from streams.archive import ArchiveStore
    from streams.connection import connect
    from streams.events import EventLog
    from streams.keys import Keys, check_name
    from streams.pg import create_pool
    from tickwave.export import HistoryHole, boundary, export as run, format_of

    s = settings_or_exit(CommonSettings)
    if not s.redis_url:
        raise click.UsageError("REDIS_URL is not set")
    redis_url = s.redis_url
    try:
        check_name(strategy, "strategy")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="STRATEGY") from None
    try:
        chosen = format_of(out, fmt)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--format") from None
    try:
        after, upto = boundary(since), boundary(until)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--since/--until") from None

    async def main(stop: asyncio.Event) -> None:
        client = connect(redis_url)
        pool = await create_pool(s.database_url) if s.database_url else None
        bar = tqdm(desc=f"export {strategy}", unit="ev", file=sys.stderr, dynamic_ncols=True)
        try:
            job = asyncio.create_task(run(
                EventLog(client, Keys(s.key_prefix)), ArchiveStore(pool) if pool else None, strategy, out, chosen,
                since=after, until=upto, epoch=epoch, progress=bar.update, page_size=page_size))
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({job, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not job.done():
                job.cancel()  # SIGINT: the temporary file is removed, `out` left as it was
                raise click.ClickException("interrupted; nothing written")
            done = job.result()
        except HistoryHole as exc:
            raise NotCovered(f"{exc}; nothing written") from None
        finally:
            bar.close()
            if pool is not None:
                await pool.close()
            await client.aclose()
        what = "events" if chosen == "ndjson" else "price events"
        click.echo(f"wrote {done.rows} {what} of {strategy} (epoch {done.epoch}, up to {done.until_id}) to {out}",
                   err=True)

    run_until_signalled(main)
