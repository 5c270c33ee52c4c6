"""The Grafana dashboard and the alert rules against the code: every metric they query is one the
code exports, every exported metric has a panel, and the dashboard's JSON agrees with its queries
(datasource, ids, layout, legends, units). promtool parses the queries in test_prometheus.py."""

import json
import re
from pathlib import Path

import yaml

import agents.archiver  # noqa: F401 - registers its metrics
import agents.ingest  # noqa: F401
import agents.relay  # noqa: F401
import agents.worker  # noqa: F401
import edge.metrics  # noqa: F401
import streams.driver.metrics  # noqa: F401
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


DASHBOARD = json.loads((INFRA / "grafana" / "dashboards" / "tickwave.json").read_text())
PANELS = DASHBOARD["panels"]


def test_dashboard_queries_only_exported_metrics():
    dash = json.loads((INFRA / "grafana" / "dashboards" / "tickwave.json").read_text())
    wanted = {m for panel in dash["panels"] for t in panel["targets"] for m in queried(t["expr"])}
    assert wanted and wanted <= exported_names(), wanted - exported_names()


def test_alert_rules_query_only_exported_metrics():
    rules = yaml.safe_load((INFRA / "prometheus" / "alerts.yml").read_text())
    wanted = {m for g in rules["groups"] for r in g["rules"] for m in queried(r["expr"])}
    assert wanted and wanted <= exported_names(), wanted - exported_names()


def _family(name: str) -> str:
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_every_exported_metric_has_a_panel():
    exported = {m.name for m in REGISTRY.collect() if m.name.startswith("tickwave_")}
    on_panels = {_family(m) for p in PANELS for t in p["targets"] for m in queried(t["expr"])}
    assert on_panels == exported, {"without a panel": exported - on_panels, "not exported": on_panels - exported}


def test_every_panel_reads_the_provisioned_prometheus():
    provisioned = yaml.safe_load((INFRA / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = provisioned["datasources"]
    wanted = {"type": source["type"], "uid": source["uid"]}
    for p in PANELS:
        assert p["datasource"] == wanted, p["title"]
        assert all(t["datasource"] == wanted for t in p["targets"]), p["title"]


def test_panel_ids_ref_ids_and_layout():
    assert len({p["id"] for p in PANELS}) == len(PANELS), "panel ids repeat"
    cells: dict[tuple[int, int], str] = {}
    for p in PANELS:
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(set(refs)) == len(refs), p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_legends_name_only_labels_their_query_keeps():
    for p in PANELS:
        for t in p["targets"]:
            kept = {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", t["expr"]) for label in group.split(",")}
            used = set(re.findall(r"{{\s*(\w+)\s*}}", t.get("legendFormat", "")))
            assert used <= kept - {"le"}, f"{p['title']}: legend {t['legendFormat']!r} names labels the query drops"


def test_units_match_what_the_queries_return():
    for p in PANELS:
        exprs = [t["expr"] for t in p["targets"]]
        unit = p["fieldConfig"]["defaults"]["unit"]
        if all(re.match(r"^\w+(?: by \([^)]*\))?\s*\(rate\(", e) for e in exprs):
            assert unit == "ops", f"{p['title']}: per-second rates shown as {unit}"
        elif all(re.match(r"^histogram_quantile\(.*_seconds_bucket\[", e) or
                 ("_seconds" in e and "rate(" not in e) for e in exprs):
            assert unit == "s", f"{p['title']}: seconds shown as {unit}"
