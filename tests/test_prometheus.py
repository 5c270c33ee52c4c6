"""Monitoring proven: promtool checks the config and unit-tests every alert rule, and a real
Prometheus (Debian's `prometheus` package; .ci/run installs it) scrapes a running pipeline until
every target is up and every query of the Grafana dashboard returns numbers."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.driver_harness import wait_until
from tests.test_pipeline_processes import STRATEGY, Proc, pipeline_env, seed_signals, start_pipeline
from tickwave.client import PriceEvent, Snapshot, subscribe
from tickwave.servers import free_port

INFRA = Path(__file__).resolve().parents[1] / "infra"
PROMETHEUS_DIR = INFRA / "prometheus"
DASHBOARD = INFRA / "grafana" / "dashboards" / "tickwave.json"
# the port each process serves /metrics on by default (what infra/prometheus/prometheus.yml scrapes)
DEFAULT_PORTS = {9101: "ingest", 9102: "worker", 9103: "archive", 9104: "relay", 8000: "edge"}


def tool(name: str) -> str:
    """The path of a Prometheus binary; fails (never skips) when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `apt-get install prometheus` (Debian's package; .ci/run installs it "
                    "when missing)")
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=60)


def rule_names() -> set[str]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title / refId, PromQL) of every target of every panel."""
    dash = json.loads(DASHBOARD.read_text())
    return [(f"{p['title']} / {t['refId']}", t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_promtool_accepts_the_config_and_the_rules_it_loads():
    done = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout + done.stderr, "the config does not load alerts.yml"
    done = promtool("check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_rule_fires_and_stays_silent_in_its_unit_tests():
    cases = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    fires = {t["alertname"] for c in cases for t in c["alert_rule_test"] if t["exp_alerts"]}
    silent = {t["alertname"] for c in cases for t in c["alert_rule_test"] if not t["exp_alerts"]}
    assert fires == rule_names(), f"rules without a case where they fire: {rule_names() - fires}"
    assert silent == rule_names(), f"rules without a case where they stay silent: {rule_names() - silent}"
    done = promtool("test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml"))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each panel's query as a recording rule."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": expr} for i, (_, expr) in enumerate(dashboard_queries())]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


# --- a real Prometheus against a running pipeline --------------------------------------------

def scrape_config(local: dict[str, int], rules: Path) -> dict[str, Any]:
    """infra/prometheus/prometheus.yml with each job's targets pointed at this machine's processes:
    the same jobs, found by the port each one scrapes."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = []
    for job in config["scrape_configs"]:
        ports = {int(t.rsplit(":", 1)[1]) for sc in job.get("static_configs", []) for t in sc["targets"]}
        ports |= {sd["port"] for sd in job.get("dns_sd_configs", [])}
        assert len(ports) == 1, f"{job['job_name']}: one metrics port per job, got {ports}"
        process = DEFAULT_PORTS[ports.pop()]
        jobs.append({"job_name": job["job_name"], "static_configs": [{"targets": [f"127.0.0.1:{local[process]}"]}]})
    return {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": [str(rules)],
            "scrape_configs": jobs}


class Prometheus:
    name = "prometheus"

    def __init__(self, config: dict[str, Any], workdir: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}/api/v1"
        path = workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.logfile = workdir / "prometheus.log"
        with open(self.logfile, "wb") as out:
            self.proc = subprocess.Popen(
                [tool("prometheus"), f"--config.file={path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT)

    async def get(self, path: str, **params: str) -> Any:
        async with aiohttp.ClientSession() as s, s.get(self.base + path, params=params) as r:
            body = await r.json()
            assert body["status"] == "success", body
            return body["data"]

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


async def client_traffic(port: int, stop: asyncio.Event) -> None:
    """What the edge's panels count: a subscriber taking live events, a resume, a refused frame."""
    url = f"http://127.0.0.1:{port}"
    first = subscribe(url, STRATEGY)
    async for event in first:
        if isinstance(event, PriceEvent):
            break
    first.close()
    async with aiohttp.ClientSession() as s, s.ws_connect(url + "/ws/stock/prices") as ws:
        await ws.send_str("not json")  # tickwave_edge_refusals_total{reason="bad_frame:bad_json"}
        await ws.receive(timeout=5)
    live = subscribe(url, STRATEGY, last_event_id=first.last_event_id, epoch=first.epoch)  # a resume
    async with live:
        async for event in live:
            if stop.is_set():
                return
            assert not isinstance(event, Snapshot), "the resume was not recovered"


@pytest.mark.timeout(220)
async def test_prometheus_scrapes_every_process_and_every_dashboard_query_returns_data(redis, pg_url, keys,
                                                                                         redis_url, tmp_path):
    local = {name: free_port() for name in DEFAULT_PORTS.values()}
    env = {**pipeline_env(redis_url, pg_url, keys), "TICKWAVE_INGEST_METRICS_PORT": str(local["ingest"]),
           "TICKWAVE_WORKER_METRICS_PORT": str(local["worker"]), "TICKWAVE_ARCHIVE_METRICS_PORT": str(local["archive"]),
           "TICKWAVE_RELAY_METRICS_PORT": str(local["relay"]),
           # the simulator's ticks carry the wall clock, mostly outside the exchange's sessions:
           # every minute makes bars, so the K-line panels get data once a minute closes
           "TICKWAVE_KLINE_SESSIONS": "always"}
    signalled = await seed_signals(pg_url)
    procs: dict[str, Proc] = {}
    prom: Prometheus | None = None
    stop = asyncio.Event()
    traffic: asyncio.Task[None] | None = None
    try:
        procs = await start_pipeline(redis, keys, len(signalled), env, tmp_path, local["edge"])
        prom = Prometheus(scrape_config(local, PROMETHEUS_DIR / "alerts.yml"), tmp_path)
        traffic = asyncio.create_task(client_traffic(local["edge"], stop))
        everyone = [*procs.values(), prom]  # wait_until shows their logs on failure

        jobs = {j["job_name"] for j in yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())["scrape_configs"]}

        async def all_up() -> bool:
            try:
                targets = (await prom.get("/targets"))["activeTargets"]
            except aiohttp.ClientError:
                return False  # not listening yet
            return {t["labels"]["job"] for t in targets} == jobs and all(t["health"] == "up" for t in targets)
        took = await wait_until(all_up, 30, "not every target is up", everyone)  # type: ignore[arg-type]
        print(f"every target up after {took:.1f}s")

        missing: dict[str, str] = {}

        async def every_query_has_data() -> bool:
            if traffic.done() and traffic.exception():  # type: ignore[union-attr]
                raise traffic.exception()  # type: ignore[misc,union-attr]
            known = set(await prom.get("/metadata"))
            missing.clear()
            for name, expr in dashboard_queries():
                # metadata is by family: counters without _total, histograms without _bucket
                unknown = {m for m in re.findall(r"\b(tickwave_[a-z_]+)", expr)
                           if not {m, m.removesuffix("_total"), m.removesuffix("_bucket")} & known}
                if unknown:  # a name no process exports, hidden by `or vector(0)`
                    missing[name] = f"{expr}: no target exports {sorted(unknown)}"
                    continue
                result = (await prom.get("/query", query=expr))["result"]
                values = [float(r["value"][1]) for r in result]
                if not values or not all(math.isfinite(v) for v in values):
                    missing[name] = f"{expr} -> {values}"
            return not missing
        try:
            # up to a minute for the first K-line bars to close (their minute's end + grace), and scrapes after
            took = await wait_until(every_query_has_data, 100, "dashboard queries without data", everyone)  # type: ignore[arg-type]
        except AssertionError:
            raise AssertionError("dashboard queries without data:\n" + "\n".join(
                f"  {k}: {v}" for k, v in missing.items())) from None
        print(f"every dashboard query ({len(dashboard_queries())}) returned numbers {took:.1f}s later")

        rules = [r for g in (await prom.get("/rules"))["groups"] for r in g["rules"]]
        assert {r["name"] for r in rules} == rule_names()
        assert [r["name"] for r in rules if r["health"] != "ok"] == [], "alert rules failing to evaluate"
        assert [p.name for p in procs.values() if not p.alive()] == []
    finally:
        stop.set()
        if traffic is not None:
            traffic.cancel()
        if prom is not None:
            prom.stop()
        for p in procs.values():
            if p.alive():
                p.proc.kill()
                p.proc.wait(5)
