"""`tickwave edge`: the WebSocket and HTTP service."""

from __future__ import annotations

import click
from aiohttp import web

from edge.settings import EdgeSettings
from tickwave.runtime import settings_or_exit


@click.command()
def edge() -> None:
    """Serve WebSocket push, the HTTP API and /metrics on TICKWAVE_EDGE_PORT (default 8000)."""
    from edge.app import create_app

    s = settings_or_exit(EdgeSettings)
    if not s.redis_url:
        raise click.UsageError("REDIS_URL is not set")
    click.echo(f"tickwave edge on http://{s.edge_host}:{s.edge_port}/ (node {s.edge_node})", err=True)
    # on SIGTERM/SIGINT the app closes every WebSocket with 1001 first (edge.app.going_away); the
    # timeout bounds what is left (history downloads), so the process exits within a few seconds
    web.run_app(create_app(s), host=s.edge_host, port=s.edge_port, print=None, access_log=None,
                shutdown_timeout=s.edge_shutdown_s)
