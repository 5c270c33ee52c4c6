"""The baseline for bench/signals_api: a bare aiohttp handler answering the same JSON body from
memory (no PostgreSQL, no row building), so the ratio is what the list call adds to aiohttp."""

import sys
from pathlib import Path

from aiohttp import web

BODY = Path(sys.argv[2]).read_bytes() if len(sys.argv) > 2 else b"{}"


async def buy(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


app = web.Application()
app.router.add_get("/api/signals/buy", buy)
app.router.add_get("/healthz", healthz)

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
