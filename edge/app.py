"""The edge's app factory: routes, background resources in cleanup_ctx, JSON errors."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from aiohttp import web

from edge import api, market
from edge.auth import TokenVerifier
from edge.hub import Hub
from edge.limits import AddressCounter
from edge.settings import EdgeSettings
from edge.signal_lists import SignalLists
from edge.state import EdgeState, state_key
from edge.ws import websocket
from edge.klines import kline_api
from streams.archive import ArchiveStore
from streams.connection import connect, dedicated
from streams.events import EventLog
from streams.keys import Keys
from streams.pg import create_pool
from streams.signals import SignalStore

log = logging.getLogger("tickwave.edge")
STATIC = Path(__file__).parent / "static"


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error is JSON with a message; unexpected ones are logged once, never shown."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.content_type == "application/json":
            raise
        return web.json_response({"error": exc.reason}, status=exc.status)
    except Exception:
        log.exception("request failed", extra={"path": request.path})
        return web.json_response({"error": "internal error"}, status=500)


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html")


async def going_away(app: web.Application) -> None:
    """Close every WebSocket with 1001 (going away), all at once, and stop the hub's readers."""
    st = app[state_key]
    await asyncio.gather(*(session.going_away() for session in list(st.sessions)), st.hub.close())


def create_app(settings: EdgeSettings) -> web.Application:
    """The edge application; Redis (and PostgreSQL when configured) open in cleanup_ctx."""
    if not settings.redis_url:
        raise ValueError("REDIS_URL is not set")
    redis_url = settings.redis_url
    app = web.Application(middlewares=[json_errors])

    # every connection of the node carries its name: `CLIENT LIST` shows what a node holds
    name = f"tickwave-edge-{settings.edge_node}"

    async def resources(app: web.Application) -> AsyncIterator[None]:
        client = connect(redis_url, pool_size=settings.edge_redis_connections, client_name=name)
        keys = Keys(settings.key_prefix)
        events = EventLog(client, keys)
        pool = await create_pool(settings.database_url) if settings.database_url else None
        verifier = (TokenVerifier(secret=settings.edge_jwt_secret, public_key=settings.edge_jwt_public_key,
                                  audience=settings.edge_jwt_audience) if settings.auth_enabled else None)
        hub = Hub(client, keys, events, node=settings.edge_node, reader=lambda: dedicated(redis_url, client_name=name),
                  tick_partitions=settings.tick_partitions, max_tails=settings.edge_max_tails,
                  cluster_poll_ms=settings.edge_cluster_poll_ms, batch_window_ms=settings.edge_batch_window_ms)
        app[state_key] = EdgeState(settings, client, keys, events, hub, ArchiveStore(pool) if pool else None,
                                   pool, verifier, AddressCounter(settings.edge_max_connections_per_ip),
                                   SignalLists(SignalStore(pool)) if pool else None)
        # start-up's objects (modules, settings, pools) never become garbage: out of the collector's
        # way, full collections walk only what connections made (they took 87-380 ms each in bench.pipeline)
        gc.collect()
        gc.freeze()
        log.info("edge started", extra={"node": settings.edge_node, "group": hub.group,
                                         "auth": bool(verifier), "archive": bool(pool)})
        yield
        await going_away(app)
        if pool is not None:
            await pool.close()
        await client.aclose()
        log.info("edge stopped", extra={"node": settings.edge_node})

    app.cleanup_ctx.append(resources)
    # aiohttp runs on_shutdown before it waits for the handlers: clients hear 1001 at once
    app.on_shutdown.append(going_away)
    app.router.add_get("/ws/stock/prices", websocket)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/api/signals/buy", api.buy_signals)
    app.router.add_get("/api/strategies", api.strategies)
    app.router.add_get("/api/strategies/{strategy}/snapshot", api.snapshot)
    app.router.add_get("/api/strategies/{strategy}/events", api.events)
    app.router.add_get("/api/stocks/{ts_code}/kline", kline_api)
    app.router.add_get("/api/market/breadth", market.breadth)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", api.metrics)
    app.router.add_get("/", index)
    return app
