"""Every metric the dashboard and alert rules query is one the code exports."""

import json
import re
from pathlib import Path

import yaml

import agents.archiver  # noqa: F401 - registers its metrics
import agents.ingest  # noqa: F401
import agents.relay  # noqa: F401
import agents.worker  # noqa: F401
import edge.metrics  # noqa: F401
from prometheus_client import REGISTRY

INFRA = Path(__file__).parent.parent / "infra"


def exported_names() -> set[str]:
    names = set()
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            names.add(sample.name)
        names.add(metric.name)
        names.add(metric.name + "_total")
        names.add(metric.name + "_bucket")
    return names


def queried(expr: str) -> set[str]:
    return {m for m in re.findall(r"\b(tickwave_[a-z_]+)", expr)}


def test_dashboard_queries_only_exported_metrics():
    dash = json.loads((INFRA / "grafana" / "dashboards" / "tickwave.json").read_text())
    wanted = {m for panel in dash["panels"] for t in panel["targets"] for m in queried(t["expr"])}
    assert wanted and wanted <= exported_names(), wanted - exported_names()


def test_alert_rules_query_only_exported_metrics():
    rules = yaml.safe_load((INFRA / "prometheus" / "alerts.yml").read_text())
    wanted = {m for g in rules["groups"] for r in g["rules"] for m in queried(r["expr"])}
    assert wanted and wanted <= exported_names(), wanted - exported_names()
