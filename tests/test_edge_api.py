"""The edge's HTTP API: strategies, snapshot, streamed history (NDJSON and CSV), health, metrics."""

import csv
import io
import json

import aiohttp
import pytest

from streams.archive import ArchiveStore
from streams.events import EventLog
from streams.pg import create_pool, upgrade
from tests.edge_harness import edge_settings, running_edge
from tests.factories import price_changes, signal_change


@pytest.fixture
async def api(redis_url, keys, redis, pg_url):
    await upgrade(pg_url)
    async with running_edge(edge_settings(redis_url, keys, database_url=pg_url)) as base:
        async with aiohttp.ClientSession(base_url=base) as session:
            yield session


async def test_strategies_lists_every_strategy_with_its_epoch(api, redis, keys):
    log = EventLog(redis, keys)
    ids = await log.append_events("volume_wave", price_changes(4))
    await log.append_events("breakout", price_changes(2, "breakout"))
    async with api.get("/api/strategies") as r:
        doc = await r.json()
    assert r.status == 200 and doc["count"] == 2
    vw = next(s for s in doc["strategies"] if s["strategy"] == "volume_wave")
    assert vw["latest_event_id"] == ids[-1] and vw["epoch"] == await log.epoch("volume_wave")


async def test_snapshot_has_the_latest_price_per_stock(api, redis, keys):
    log = EventLog(redis, keys)
    ids = await log.append_events("volume_wave", price_changes(7))
    async with api.get("/api/strategies/volume_wave/snapshot") as r:
        doc = await r.json()
    assert doc["count"] == 3
    assert {row["event_id"] for row in doc["data"]} == set(ids[-3:])
    async with api.get("/api/strategies/nobody/snapshot") as r:
        assert r.status == 404 and "unknown strategy" in (await r.json())["error"]


async def test_events_stream_as_ndjson_across_the_archive_boundary(api, redis, keys, pg_url):
    log = EventLog(redis, keys, maxlen=300, archive_group=None)  # archived by hand below
    pool = await create_pool(pg_url)
    store = ArchiveStore(pool)
    ids = []
    for start in range(0, 3000, 100):
        ids += await log.append_events("volume_wave", price_changes(100, start=start))
        await store.write("volume_wave", await log.epoch("volume_wave"),
                          await log.read_after("volume_wave", ids[-101] if len(ids) > 100 else None))
    await pool.close()
    async with api.get("/api/strategies/volume_wave/events", params={"since": ids[9], "limit": "2500"}) as r:
        assert r.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in (await r.text()).splitlines() if line]
    assert [d["event_id"] for d in lines] == ids[10:2510]


async def test_events_as_csv_up_to_an_id(api, redis, keys):
    log = EventLog(redis, keys)
    ids = await log.append_events("volume_wave", price_changes(20))
    await log.append_events("volume_wave", [signal_change("add")])
    async with api.get("/api/strategies/volume_wave/events",
                       params={"since": ids[4], "until": ids[14], "format": "csv"}) as r:
        rows = list(csv.DictReader(io.StringIO(await r.text())))
    assert [row["event_id"] for row in rows] == ids[5:15]
    assert {"ts_code", "price", "change_percent", "tick_time"} <= rows[0].keys()


@pytest.mark.parametrize(
    ("params", "status"),
    [({"since": "yesterday"}, 400), ({"format": "xml"}, 400), ({"limit": "0"}, 400), ({"limit": "lots"}, 400)],
)
async def test_bad_history_requests_get_json_errors(api, redis, keys, params, status):
    await EventLog(redis, keys).append_events("volume_wave", price_changes(2))
    async with api.get("/api/strategies/volume_wave/events", params=params) as r:
        assert r.status == status
        assert (await r.json())["error"]


async def test_history_that_cannot_be_covered_says_why(api, redis, keys):
    log = EventLog(redis, keys)
    await log.append_events("volume_wave", price_changes(2))
    async with api.get("/api/strategies/volume_wave/events", params={"epoch": "old-epoch"}) as r:
        doc = await r.json()
    assert r.status == 410 and doc["reason"] == "epoch_changed"
    async with api.get("/api/strategies/nobody/events") as r:
        assert r.status == 404


async def test_health_readiness_and_metrics(api):
    async with api.get("/healthz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"
    async with api.get("/readyz") as r:
        doc = await r.json()
        assert r.status == 200 and doc["checks"]["redis"] == "ok" and doc["checks"]["postgres"] == "ok"
    async with api.get("/metrics") as r:
        text = await r.text()
        assert "tickwave_edge_connections" in text and "tickwave_edge_push_latency_seconds" in text
    async with api.get("/no/such/path") as r:
        assert r.status == 404 and (await r.json())["error"]


async def test_readyz_fails_when_redis_goes_away(keys):
    from tickwave import servers

    own = servers.start_redis()
    try:
        async with running_edge(edge_settings(own.url, keys)) as base:
            async with aiohttp.ClientSession(base_url=base) as s:
                async with s.get("/readyz") as r:
                    assert r.status == 200
                own.stop()
                async with s.get("/readyz") as r:
                    doc = await r.json()
                    assert r.status == 503 and doc["ready"] is False
                    assert doc["checks"]["redis"].startswith("unreachable")
                async with s.get("/healthz") as r:
                    assert r.status == 200  # alive, just not ready
    finally:
        own.stop()


async def test_an_edge_whose_postgres_is_unreachable_refuses_to_start(redis_url, keys, redis):
    from tickwave.servers import free_port

    dead_pg = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    with pytest.raises(Exception):  # noqa: B017 - asyncpg raises OSError subclasses here
        async with running_edge(edge_settings(redis_url, keys, database_url=dead_pg)):
            pass
