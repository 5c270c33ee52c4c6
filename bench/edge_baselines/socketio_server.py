"""The baseline for bench/edge (a): python-socketio on aiohttp with its Redis manager.

Clients join the room of a strategy; a publisher emits through the Redis manager
(write-only), the way a socketio deployment fans out across nodes.
"""

import os
import sys

import socketio
from aiohttp import web

mgr = socketio.AsyncRedisManager(os.environ["REDIS_URL"], channel=os.environ.get("SIO_CHANNEL", "socketio"))
sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=mgr, cors_allowed_origins="*")
app = web.Application()
sio.attach(app)


@sio.event
async def subscribe(sid, data):  # type: ignore[no-untyped-def]
    await sio.enter_room(sid, data["target"])
    return {"ok": True}


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


app.router.add_get("/healthz", healthz)

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
