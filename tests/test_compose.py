"""docker-compose.yml, checked for its structure where no Docker engine runs: the services, the
one published port behind a WebSocket-capable load balancer, commands the CLI really has, the
demo profile, and Prometheus scraping exactly the processes that serve metrics."""

from __future__ import annotations

import csv
import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from agents.settings import ArchiverSettings, IngestSettings, RelaySettings, WorkerSettings
from edge.app import create_app
from edge.settings import EdgeSettings
from schemas.universe import default_universe
from tickwave.cli import main

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
HAPROXY = (REPO / "infra" / "haproxy" / "haproxy.cfg").read_text()
# the processes that serve /metrics, and the setting that holds their port
METRICS_SETTING = {
    "ingest": (IngestSettings, "ingest_metrics_port"),
    "worker": (WorkerSettings, "worker_metrics_port"),
    "archive": (ArchiverSettings, "archive_metrics_port"),
    "relay": (RelaySettings, "relay_metrics_port"),
    "edge": (EdgeSettings, "edge_port"),
}


def tickwave_services() -> dict[str, dict[str, Any]]:
    """Services running the tickwave image (its entrypoint is the `tickwave` command)."""
    return {name: s for name, s in SERVICES.items() if "build" in s}


def published(service: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for port in service.get("ports", []):
        host, _, container = str(port).rpartition(":")
        out.append((host, container))
    return out


def metrics_port(service: dict[str, Any]) -> int | None:
    """The port the service's process serves /metrics on, from the setting's default or the
    service's environment; None for a process that serves none."""
    found = METRICS_SETTING.get(service["command"][0])
    if found is None:
        return None
    cls, field = found
    override = service.get("environment", {}).get(f"TICKWAVE_{field.upper()}")
    port = int(override) if override is not None else cls.model_fields[field].default
    return port or None


def test_the_services():
    assert set(SERVICES) == {"redis", "postgres", "migrate", "ingest", "ingest-demo", "demo-signals", "agents",
                             "archiver", "relay", "edge", "lb", "prometheus", "grafana"}
    assert set(tickwave_services()) == set(SERVICES) - {"redis", "postgres", "lb", "prometheus", "grafana"}
    dockerfile = (REPO / SERVICES["edge"]["build"]["dockerfile"]).read_text()
    assert re.search(r'^ENTRYPOINT \["tickwave"\]$', dockerfile, re.M), "the image's entrypoint is not tickwave"


def _resolve(argv: list[str], volumes: list[str]) -> click.Context:
    """Parse `tickwave <argv>` with click, as the container would, without running it. Paths a
    volume mounts are read from the repository, so a file argument must exist there."""
    mounts = {}
    for volume in volumes:
        host, container, *_ = volume.split(":")
        if host.startswith("."):
            mounts[container] = str(REPO / host)
    rest = [mounts.get(a, a) for a in argv]
    # the groups on the way (tickwave, db, signals, ...) take no options of their own
    ctx = click.Context(main, info_name="tickwave")
    command: click.Command = main
    while isinstance(command, click.Group):
        name, sub, rest = command.resolve_command(ctx, rest)
        assert sub is not None and name is not None, f"tickwave has no command {rest[:1]}"
        if isinstance(sub, click.Group):
            ctx = click.Context(sub, info_name=name, parent=ctx)
        else:
            ctx = sub.make_context(name, list(rest), parent=ctx)
        command = sub
    return ctx


@pytest.mark.parametrize("name", sorted(tickwave_services()))
def test_every_command_is_a_real_tickwave_command(name):
    service = SERVICES[name]
    try:
        ctx = _resolve(service["command"], service.get("volumes", []))
    except click.UsageError as exc:
        pytest.fail(f"{name}: `tickwave {shlex.join(service['command'])}`: {exc.format_message()}")
    assert ctx.command.callback is not None, f"{name}: `tickwave {shlex.join(service['command'])}` runs nothing"


def test_every_process_waits_for_the_schema():
    for name, service in tickwave_services().items():
        deps = service["depends_on"]
        assert deps["redis"] == {"condition": "service_healthy"} and deps["postgres"] == {"condition": "service_healthy"}
        if name != "migrate":
            assert deps["migrate"] == {"condition": "service_completed_successfully"}, name
    assert SERVICES["migrate"]["command"] == ["db", "upgrade"] and SERVICES["migrate"]["restart"] == "no"


def test_one_published_port_reaches_the_scaled_edge_through_the_load_balancer():
    ports = {name: published(s) for name, s in SERVICES.items() if s.get("ports")}
    assert ports == {"lb": [("8000", "8000")], "prometheus": [("9090", "9090")], "grafana": [("3000", "3000")]}
    edge_port = EdgeSettings.model_fields["edge_port"].default
    assert SERVICES["edge"]["expose"] == [str(edge_port)] and "ports" not in SERVICES["edge"]
    assert SERVICES["lb"]["image"].startswith("haproxy:")
    mounted = dict(v.split(":")[:2] for v in SERVICES["lb"]["volumes"])
    assert mounted == {"./infra/haproxy/haproxy.cfg": "/usr/local/etc/haproxy/haproxy.cfg"}
    assert re.search(r"^\s*bind :8000$", HAPROXY, re.M), "haproxy does not listen on the published port"
    # every replica of `edge`, found through Docker's DNS, on the edge's port
    server = re.search(r"^\s*server-template \S+ (\d+) (\S+):(\d+) (.*)$", HAPROXY, re.M)
    assert server and (server.group(2), int(server.group(3))) == ("edge", edge_port)
    assert int(server.group(1)) >= 2 and "resolvers docker" in server.group(4) and "check" in server.group(4)
    assert re.search(r"^\s*nameserver \S+ 127\.0\.0\.11:53$", HAPROXY, re.M)
    # WebSockets: HTTP mode passes the upgrade; a tunnel timeout far above the edge's heartbeat
    assert re.search(r"^\s*mode http$", HAPROXY, re.M)
    tunnel = re.search(r"^\s*timeout tunnel (\d+)([smh])$", HAPROXY, re.M)
    assert tunnel, "no `timeout tunnel`: upgraded WebSockets would be cut at the client/server timeout"
    seconds = int(tunnel.group(1)) * {"s": 1, "m": 60, "h": 3600}[tunnel.group(2)]
    assert seconds > 2 * EdgeSettings.model_fields["edge_heartbeat_s"].default
    # health checks and the WebSocket path are routes the edge has
    check = re.search(r"^\s*option httpchk GET (\S+)$", HAPROXY, re.M)
    routes = {r.resource.canonical for r in create_app(EdgeSettings(redis_url="redis://unused")).router.routes()
              if r.resource is not None}
    assert check and check.group(1) in routes and "/ws/stock/prices" in routes


def test_the_demo_profile_simulates_at_any_hour_with_demo_signals():
    ingests = {name: s for name, s in tickwave_services().items() if s["command"][0] == "ingest"}
    assert {name: s.get("profiles") for name, s in ingests.items()} == {"ingest": ["market"], "ingest-demo": ["demo"]}
    assert "--ignore-clock" in ingests["ingest-demo"]["command"]
    assert "--ignore-clock" not in ingests["ingest"]["command"]
    signals = SERVICES["demo-signals"]
    assert signals["profiles"] == ["demo"] and signals["command"][:2] == ["signals", "import"]
    # the demo signals are on stocks the demo simulator moves
    ctx = _resolve(ingests["ingest-demo"]["command"], [])
    simulated = {x.ts_code for x in default_universe().pick(ctx.params["stocks"])}
    host = next(v.split(":")[0] for v in signals["volumes"] if v.split(":")[1] == signals["command"][2])
    with open(REPO / host, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["ts_code"] for r in rows} <= simulated
    assert {r["strategy"] for r in rows} == {"volume_wave"}


def test_prometheus_scrapes_exactly_the_processes_that_serve_metrics():
    config = yaml.safe_load((REPO / "infra" / "prometheus" / "prometheus.yml").read_text())
    scraped = set()
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            scraped |= {(name, sd["port"]) for name in sd["names"]}
        for sc in job.get("static_configs", []):
            scraped |= {(t.rsplit(":", 1)[0], int(t.rsplit(":", 1)[1])) for t in sc["targets"]}
    serving = set()
    for name, service in tickwave_services().items():
        port = metrics_port(service)
        if port is not None:
            aliases = service.get("networks", {}).get("default", {}).get("aliases", [])
            serving.add((aliases[0] if aliases else name, port))
    assert scraped == serving
    mounted = {v.split(":")[1]: v.split(":")[0] for v in SERVICES["prometheus"]["volumes"]}
    assert mounted == {"/etc/prometheus/prometheus.yml": "./infra/prometheus/prometheus.yml",
                       "/etc/prometheus/alerts.yml": "./infra/prometheus/alerts.yml"}
    assert config["rule_files"] == ["alerts.yml"]  # beside the config in the container


def test_every_mounted_file_exists():
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("."):
                assert (REPO / host).exists(), f"{name} mounts {host}, which does not exist"
