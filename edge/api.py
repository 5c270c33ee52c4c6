"""HTTP API: the signal list, strategies, snapshots, streamed history, health, readiness and metrics."""

from __future__ import annotations

import os

import csv
import io
import json
import logging
from typing import Any

import asyncpg
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from edge.state import state_key
from schemas.messages import price_row
from streams.codec import parse_id
from streams.errors import ArchiveUnavailable
from streams.history import history
from streams.keys import check_name

log = logging.getLogger("tickwave.edge")

PAGE = 1000
CSV_FIELDS = ["event_id", "strategy", "ts_code", "name", "price", "pre_close", "change", "change_percent",
              "signal_price", "change_since_signal_percent", "volume", "tick_time", "ingest_time"]


def error(status: int, message: str, **details: Any) -> web.Response:
    return web.json_response({"error": message, **details}, status=status)


def _strategy(request: web.Request) -> str:
    name = request.match_info["strategy"]
    try:
        return check_name(name, "strategy")
    except ValueError as exc:
        raise web.HTTPBadRequest(text=json.dumps({"error": str(exc)}), content_type="application/json") from None


async def buy_signals(request: web.Request) -> web.Response:
    """`GET /api/signals/buy?strategy=S`: the seed's list call, the strategy's current buy
    signals from PostgreSQL (a `SignalList`); an unknown strategy has an empty list."""
    st = request.app[state_key]
    strategy = request.query.get("strategy", "")
    if not strategy:
        return error(400, "strategy is required, e.g. /api/signals/buy?strategy=volume_wave")
    try:
        check_name(strategy, "strategy")
    except ValueError as exc:
        return error(400, str(exc))
    if st.signal_lists is None:
        return error(503, "signals are unavailable: this edge has no DATABASE_URL")
    try:
        body = await st.signal_lists.buy(strategy)
    except (ArchiveUnavailable, asyncpg.exceptions.UndefinedTableError) as exc:
        log.warning("signal list unavailable", extra={"strategy": strategy, "error": str(exc)})
        return error(503, "signals are unavailable right now; retry shortly")
    return web.Response(body=body, content_type="application/json")


async def strategies(request: web.Request) -> web.Response:
    st = request.app[state_key]
    out = []
    for name in await st.events.strategies():
        out.append({"strategy": name, "epoch": await st.events.epoch(name),
                    "latest_event_id": await st.events.latest_id(name),
                    "events_in_redis": await st.events.length(name)})
    return web.json_response({"strategies": out, "count": len(out)})


async def snapshot(request: web.Request) -> web.Response:
    st = request.app[state_key]
    name = _strategy(request)
    epoch = await st.events.epoch(name)
    if epoch is None:
        return error(404, f"unknown strategy {name!r}")
    rows = [price_row(s.id, s.doc()) for s in await st.events.snapshot(name)]
    return web.json_response({"strategy": name, "epoch": epoch, "data": rows, "count": len(rows)})


def _id_param(request: web.Request, name: str) -> str | None:
    raw = request.query.get(name)
    if not raw:
        return None
    try:
        parse_id(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=json.dumps({"error": f"{name} must be an event id like 1732415403000-0"}),
                                 content_type="application/json") from None
    return raw


async def events(request: web.Request) -> web.StreamResponse:
    st = request.app[state_key]
    name = _strategy(request)
    since, until = _id_param(request, "since"), _id_param(request, "until")
    fmt = request.query.get("format", "ndjson")
    if fmt not in ("ndjson", "csv"):
        return error(400, "format must be ndjson or csv")
    try:
        limit = int(request.query.get("limit", "10000"))
        if not 1 <= limit <= 1_000_000:
            raise ValueError
    except ValueError:
        return error(400, "limit must be an integer from 1 to 1000000")
    epoch = request.query.get("epoch")
    first = await history(st.events, st.archive, name, epoch=epoch, after_id=since, until_id=until,
                          limit=min(PAGE, limit))
    if not first.covered:
        status = 404 if first.reason == "unknown_strategy" else 410
        return error(status, "history cannot cover this request", reason=first.reason, epoch=first.epoch)
    resp = web.StreamResponse(headers={
        "Content-Type": "application/x-ndjson" if fmt == "ndjson" else "text/csv; charset=utf-8",
        "X-Tickwave-Epoch": first.epoch or ""})
    await resp.prepare(request)
    writer_buf = io.StringIO()
    writer = csv.DictWriter(writer_buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    if fmt == "csv":
        writer.writeheader()
    page, sent = first, 0
    while True:
        chunk = []
        for stored in page.events[: limit - sent]:
            doc = stored.doc()
            doc["event_id"] = stored.id
            doc["kind"] = stored.kind
            if fmt == "ndjson":
                chunk.append(json.dumps(doc, ensure_ascii=False))
            elif doc["kind"] == "price":
                writer.writerow(doc)
        sent += min(len(page.events), limit - sent)
        if fmt == "ndjson":
            await resp.write(("\n".join(chunk) + "\n").encode() if chunk else b"")
        else:
            await resp.write(writer_buf.getvalue().encode())
            writer_buf.seek(0)
            writer_buf.truncate()
        if sent >= limit or not page.truncated or not page.events:
            break
        page = await history(st.events, st.archive, name, epoch=page.epoch, after_id=page.events[-1].id,
                             until_id=until, limit=min(PAGE, limit - sent))
        if not page.covered:  # the stream changed under a long download: stop rather than leave a hole
            break
    await resp.write_eof()
    return resp


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    st = request.app[state_key]
    checks: dict[str, Any] = {}
    try:
        await st.events.ping()
        checks["redis"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        checks["redis"] = f"unreachable: {exc}"
    if st.pool is not None:
        try:
            await st.pool.fetchval("SELECT 1")
            checks["postgres"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["postgres"] = f"unreachable: {exc}"
    worst = max(st.hub.lag.values(), default=0)
    checks["max_consumer_lag"] = worst
    ready = all(v == "ok" for k, v in checks.items() if k != "max_consumer_lag") and worst <= st.settings.edge_ready_max_lag
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # several edge processes on one port (`tickwave edge --workers N`): a scrape reaches any
        # one of them and must see them all, summed from their files
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})
