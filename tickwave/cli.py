"""The `tickwave` command: one subcommand per process or tool."""

from __future__ import annotations

from pathlib import Path

import click

from streams.settings import CommonSettings, ConfigError, load
from tickwave.logs import setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """tickwave: real-time A-share price changes for strategy signals, on Redis Streams."""
    try:
        settings = load(CommonSettings)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    setup_logging(settings.log_level, settings.log_format)


@main.command()
@click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=Path("schema-out"),
              show_default=True, help="directory for the *.schema.json files")
def schema(out: Path) -> None:
    """Write the JSON Schema of every event and WebSocket message."""
    from schemas.export import write_json_schemas

    for path in write_json_schemas(out):
        click.echo(str(path))


def _register() -> None:
    from tickwave.cmd_analyst import export, tail
    from tickwave.cmd_edge import edge
    from tickwave.cmd_events import archive, db, events
    from tickwave.cmd_ingest import ingest
    from tickwave.cmd_run import run
    from tickwave.cmd_signals import relay, signals
    from tickwave.cmd_universe import universe
    from tickwave.cmd_worker import worker

    for command in (run, db, archive, events, ingest, edge, worker, signals, relay, universe, tail, export):
        main.add_command(command)


_register()
