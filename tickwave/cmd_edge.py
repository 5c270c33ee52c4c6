"""`tickwave edge`: the WebSocket and HTTP service, in one process or in several on one port."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

import click
from aiohttp import web

from edge.settings import EdgeSettings
from tickwave.runtime import settings_or_exit


@click.command()
@click.option("--workers", type=int, default=None,
              help="edge processes sharing the port (SO_REUSEPORT); default TICKWAVE_EDGE_WORKERS or 1")
def edge(workers: int | None) -> None:
    """Serve WebSocket push, the HTTP API and /metrics on TICKWAVE_EDGE_PORT (default 8000)."""
    s = settings_or_exit(EdgeSettings)
    if not s.redis_url:
        raise click.UsageError("REDIS_URL is not set")
    n = s.edge_workers if workers is None else workers
    if n < 1:
        raise click.UsageError("--workers must be at least 1")
    if n > 1:
        sys.exit(supervise(s, n))
    serve(s)


def serve(s: EdgeSettings) -> None:
    """One edge process (the port shared with its siblings when TICKWAVE_EDGE_REUSE_PORT is set)."""
    from edge.app import create_app

    click.echo(f"tickwave edge on http://{s.edge_host}:{s.edge_port}/ (node {s.edge_node})", err=True)
    # on SIGTERM/SIGINT the app closes every WebSocket with 1001 first (edge.app.going_away); the
    # timeout bounds what is left (history downloads), so the process exits within a few seconds
    web.run_app(create_app(s), host=s.edge_host, port=s.edge_port, print=None, access_log=None,
                shutdown_timeout=s.edge_shutdown_s, reuse_port=s.edge_reuse_port or None)


def supervise(s: EdgeSettings, n: int) -> int:
    """`n` edge processes on one port, each its own node `<node>-<i>` (its own consumer group,
    stable across restarts); the kernel spreads new connections over them. Signals are passed
    on; when one process dies the others are stopped and the exit code says so, for the
    service manager to restart the lot. Their /metrics are summed through prometheus-client's
    multiprocess mode, so a scrape of the shared port sees the whole node."""
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="tickwave-edge-metrics-")
    owned = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    for stale in os.listdir(metrics_dir):  # files of an earlier run would be summed in
        if stale.endswith(".db"):
            os.unlink(os.path.join(metrics_dir, stale))
    procs = []
    for i in range(n):
        env = {**os.environ, "TICKWAVE_EDGE_NODE": f"{s.edge_node}-{i}", "TICKWAVE_EDGE_WORKERS": "1",
               "TICKWAVE_EDGE_REUSE_PORT": "true", "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
        procs.append(subprocess.Popen([sys.executable, "-m", "tickwave", "edge"], env=env))
    click.echo(f"tickwave edge: {n} processes on port {s.edge_port} (nodes {s.edge_node}-0..{n - 1})", err=True)
    stopping = [False]

    def forward(signum: int, frame: FrameType | None) -> None:
        stopping[0] = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    try:
        while any(p.poll() is None for p in procs):
            died = [p for p in procs if p.poll() not in (None, 0)]
            if died and not stopping[0]:
                click.echo(f"tickwave edge: process {died[0].pid} exited with {died[0].returncode}; "
                           "stopping the others", err=True)
                code = 1
                forward(signal.SIGTERM, None)
            time.sleep(0.2)
        if not stopping[0] and any(p.returncode for p in procs):
            code = 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        if owned:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return code
