"""`GET /api/signals/buy?strategy=`: the seed's list call, answered from PostgreSQL."""

import asyncio
import contextlib
from datetime import date
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import pytest

from schemas.messages import SignalList
from streams.pg import create_pool, upgrade
from streams.signals import SignalStore
from tests.edge_harness import edge_settings, running_edge
from tests.signals_harness import codes, sig


@pytest.fixture
async def store(pg_url):
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    yield SignalStore(pool)
    await pool.close()


@contextlib.asynccontextmanager
async def edge_client(redis_url, keys, database_url):
    async with running_edge(edge_settings(redis_url, keys, database_url=database_url)) as base:
        async with aiohttp.ClientSession(base_url=base) as session:
            yield session


async def buy_list(session, **params):
    async with session.get("/api/signals/buy", params=params) as r:
        return r.status, await r.json()


async def test_the_list_is_the_strategys_current_buy_signals_in_the_seed_shape(redis, redis_url, keys, pg_url, store):
    await store.add(sig("600519.SH", price=1480.5, name="贵州茅台", confidence=0.8, reason="量能突破",
                        signal_date=date(2026, 11, 20)))
    await store.add(sig("000001.SZ", price=None, signal_date=date(2026, 11, 21)))
    await store.add(sig("300750.SZ", signal_date=date(2026, 11, 20)))
    await store.add(sig("002594.SZ", side="sell"))  # not a buy signal
    await store.add(sig("600036.SH", strategy="breakout"))  # another strategy
    await store.add(sig("601318.SH"))
    await store.remove("volume_wave", "601318.SH")  # no longer current
    async with edge_client(redis_url, keys, pg_url) as session:
        status, doc = await buy_list(session, strategy="volume_wave")
    assert status == 200
    assert SignalList.model_validate(doc).count == 3
    assert doc == {"strategy": "volume_wave", "count": 3, "data": [
        {"code": "000001", "ts_code": "000001.SZ", "name": "", "side": "buy", "signal_date": "2026-11-21",
         "signal_price": None, "confidence": None, "reason": ""},
        {"code": "300750", "ts_code": "300750.SZ", "name": "", "side": "buy", "signal_date": "2026-11-20",
         "signal_price": 10.0, "confidence": None, "reason": ""},
        {"code": "600519", "ts_code": "600519.SH", "name": "贵州茅台", "side": "buy", "signal_date": "2026-11-20",
         "signal_price": 1480.5, "confidence": 0.8, "reason": "量能突破"},
    ]}


async def test_an_import_shows_in_the_list_and_a_strategy_without_signals_has_an_empty_one(
        redis, redis_url, keys, pg_url, store):
    await store.import_signals([sig(c) for c in codes(500)])
    async with edge_client(redis_url, keys, pg_url) as session:
        status, doc = await buy_list(session, strategy="volume_wave")
        assert status == 200 and doc["count"] == 500
        assert sorted(row["ts_code"] for row in doc["data"]) == codes(500)
        assert await buy_list(session, strategy="nobody") == (200, {"strategy": "nobody", "data": [], "count": 0})


async def test_the_list_follows_every_change_at_once(redis, redis_url, keys, pg_url, store):
    async def codes_listed(session):
        status, doc = await buy_list(session, strategy="volume_wave")
        assert status == 200
        return [(row["ts_code"], row["signal_price"]) for row in doc["data"]]

    async with edge_client(redis_url, keys, pg_url) as session:
        assert await codes_listed(session) == []
        await store.add(sig("600519.SH"))
        assert await codes_listed(session) == [("600519.SH", 10.0)]
        await store.add(sig("600519.SH", price=11.0))
        assert await codes_listed(session) == [("600519.SH", 11.0)]
        await store.add(sig("600519.SH", strategy="breakout"))  # another list changed: this one is the same
        assert await codes_listed(session) == [("600519.SH", 11.0)]
        await store.import_signals([sig("000001.SZ")])
        assert await codes_listed(session) == [("000001.SZ", 10.0), ("600519.SH", 11.0)]
        await store.remove("volume_wave", "600519.SH")
        assert await codes_listed(session) == [("000001.SZ", 10.0)]


@pytest.mark.parametrize(("params", "message"), [
    ({}, "strategy is required"),
    ({"strategy": ""}, "strategy is required"),
    ({"strategy": "volume wave"}, "strategy 'volume wave' must match"),
    ({"strategy": "vw{0}"}, "must match"),
    ({"strategy": "x" * 101}, "must match"),
])
async def test_a_bad_strategy_is_a_400_with_a_json_error(redis, redis_url, keys, pg_url, store, params, message):
    async with edge_client(redis_url, keys, pg_url) as session:
        status, doc = await buy_list(session, **params)
    assert status == 400 and message in doc["error"]


async def test_without_postgres_configured_the_list_is_a_503(redis, redis_url, keys):
    async with edge_client(redis_url, keys, None) as session:
        status, doc = await buy_list(session, strategy="volume_wave")
    assert status == 503 and "no DATABASE_URL" in doc["error"]


class Proxy:
    """A TCP proxy to PostgreSQL that a test can cut (every connection dropped, none accepted)
    and restore on the same port. The server may listen on TCP or, as the embedded pgserver
    does, only on a Unix socket (`?host=/dir` in its URL)."""

    def __init__(self, database_url: str):
        parts = urlsplit(database_url)
        query = dict(parse_qsl(parts.query))
        port = parts.port or int(query.get("port", 5432))
        self.unix = None if parts.hostname else f"{query.get('host', '/var/run/postgresql')}/.s.PGSQL.{port}"
        self.target = (parts.hostname or "", port)
        self.port = 0
        self.server: asyncio.Server | None = None
        self.links: set[asyncio.StreamWriter] = set()

    async def start(self) -> "Proxy":
        self.server = await asyncio.start_server(self._link, "127.0.0.1", self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _link(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.unix:
            server_r, server_w = await asyncio.open_unix_connection(self.unix)
        else:
            server_r, server_w = await asyncio.open_connection(*self.target)
        self.links |= {client_w, server_w}

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            w.close()

        await asyncio.gather(pump(client_r, server_w), pump(server_r, client_w))

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.links:
            w.close()
        self.links.clear()
        await self.server.wait_closed()

    def url(self, database_url: str) -> str:
        parts = urlsplit(database_url)
        query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port")]
        return urlunsplit(parts._replace(netloc=f"{parts.username or 'postgres'}@127.0.0.1:{self.port}",
                                         query=urlencode(query)))


async def test_with_postgres_gone_the_list_is_a_503_until_it_is_back(redis, redis_url, keys, pg_url, store):
    await store.add(sig("600519.SH"))
    proxy = await Proxy(pg_url).start()
    try:
        async with edge_client(redis_url, keys, proxy.url(pg_url)) as session:
            assert (await buy_list(session, strategy="volume_wave"))[1]["count"] == 1
            await proxy.cut()
            status, doc = await buy_list(session, strategy="volume_wave")
            assert status == 503 and doc == {"error": "signals are unavailable right now; retry shortly"}
            await proxy.start()
            assert (await buy_list(session, strategy="volume_wave"))[1]["count"] == 1
    finally:
        await proxy.cut()
