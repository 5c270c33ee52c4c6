"""Market breadth at the edge: `market_update` frames and `GET /api/market/breadth`.

The `market` subscription follows the event stream of the reserved strategy name `market`
with the strategies' machinery (the node's consumer group tail, resume by event id and
epoch, the archive); only its frames and its snapshot (the newest entry, not a hash of
latest prices) are its own.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web

from edge.state import state_key
from schemas.messages import breadth_rows
from streams.codec import StoredEvent

log = logging.getLogger("tickwave.edge")

MARKET = "market"


def market_update(target: str, epoch: str | None, event_id: str, doc: dict[str, Any], *,
                  snapshot: bool = False) -> str:
    """The `market_update` frame of one breadth entry (its stored JSON, parsed)."""
    return orjson.dumps({
        "type": "market_update", "target": target, "epoch": epoch, "event_id": event_id, "snapshot": snapshot,
        "data": breadth_rows(event_id, doc),
    }).decode()


def snapshot_frame(target: str, epoch: str | None, newest: StoredEvent | None) -> str | None:
    """The snapshot a subscriber without `last_event_id` gets: the newest breadth entry."""
    if newest is None or not newest.is_breadth:
        return None
    try:
        return market_update(target, epoch, newest.id, newest.doc(), snapshot=True)
    except (KeyError, TypeError, ValueError):
        log.warning("unreadable breadth entry", extra={"event_id": newest.id})
        return None


async def breadth(request: web.Request) -> web.Response:
    """`GET /api/market/breadth`: the latest breadth (a `MarketBreadth`), 404 before the first."""
    st = request.app[state_key]
    newest = await st.events.latest(MARKET)
    if newest is None or not newest.is_breadth:
        return web.json_response({"error": "no market breadth yet"}, status=404)
    try:
        rows = breadth_rows(newest.id, newest.doc())
    except (KeyError, TypeError, ValueError):
        return web.json_response({"error": "the latest market breadth is unreadable"}, status=500)
    return web.Response(body=orjson.dumps({"event_id": newest.id, "data": rows}), content_type="application/json")
