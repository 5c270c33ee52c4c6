"""WebSocket clients for bench.pipeline (c), in a process of their own: picows connections, each
subscribed to one strategy, noting every live price row's event id and its latency from the
row's tick time to the frame's arrival.

picows (Cython; frames handed to a callback, no per-frame task or future) rather than aiohttp's
client: the clients share the machine's 2 cores with Redis, the worker and the edge, and every
microsecond they spend per frame is taken from what is measured. They run on uvloop when it
is installed (the `bench` extra).

The parent (bench.pipeline) drives a process through a Pipe: it sends ("start", url, strategies),
gets ("ready", retries) once all its clients are subscribed (and how many subscribes had to be
resent), later sends ("report", phases) with the event
ids each strategy's stream got in each timed phase, and gets back one `PhaseResult` per phase.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.connection import Connection
from typing import Any, cast

import orjson
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

CONNECTS_AT_ONCE = 50
RETRIES = 5  # subscribes resent after an `unavailable` answer (the edge says: retry shortly)


@dataclass
class PhaseResult:
    """What this process's clients saw of one phase's events."""

    latencies_ms: array  # type: ignore[type-arg]  # one per (client, event) delivered, tick time -> frame
    delivered: int
    lost: int  # events of the client's strategy in the phase that it never received
    duplicated: int  # deliveries beyond the first of the same event
    clients_with_loss: int


class Client(WSListener):  # type: ignore[misc]
    def __init__(self, strategy: str):
        self.strategy = strategy
        self.subscribe = orjson.dumps({"type": "subscribe", "target": strategy})
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ids: list[str] = []
        self.latencies = array("d")
        self.transport: WSTransport | None = None
        self.error: str | None = None
        self.retries = 0

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            return  # picows answers pings itself
        now_ms = time.time() * 1000
        if not frame.fin:  # aiohttp sends every message as one frame
            self.error = "fragmented frame"
            return
        doc: dict[str, Any] = orjson.loads(frame.get_payload_as_bytes())
        kind = doc.get("type")
        if kind == "price_update":
            if doc.get("snapshot"):
                return
            for row in doc["data"]:
                self.ids.append(row["event_id"])
                self.latencies.append(now_ms - datetime.fromisoformat(row["timestamp"]).timestamp() * 1000)
        elif kind == "connected":
            transport.send(WSMsgType.TEXT, self.subscribe)
        elif kind == "subscribed":
            if not self.subscribed.done():
                self.subscribed.set_result(None)
        elif kind == "error":
            if doc.get("code") == "unavailable" and not self.subscribed.done() and self.retries < RETRIES:
                self.retries += 1
                asyncio.get_running_loop().call_later(0.5, transport.send, WSMsgType.TEXT, self.subscribe)
                return
            self.error = str(doc)
            if not self.subscribed.done():
                self.subscribed.set_exception(RuntimeError(f"subscribe refused: {doc}"))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(RuntimeError("disconnected before subscribing"))


def summarise(clients: list[Client], phases: list[dict[str, list[str]]]) -> list[PhaseResult]:
    """Each phase's deliveries against the ids its strategies' streams got in it."""
    out = []
    for expected in phases:
        wanted = {s: set(ids) for s, ids in expected.items()}
        lat = array("d")
        delivered = lost = duplicated = with_loss = 0
        for c in clients:
            mine = wanted.get(c.strategy, set())
            seen: set[str] = set()
            for eid, ms in zip(c.ids, c.latencies):
                if eid not in mine:
                    continue
                if eid in seen:
                    duplicated += 1
                    continue
                seen.add(eid)
                lat.append(ms)
            delivered += len(seen)
            missing = len(mine) - len(seen)
            lost += missing
            with_loss += missing > 0
        out.append(PhaseResult(lat, delivered, lost, duplicated, with_loss))
    return out


async def _clients(conn: Connection, url: str, strategies: list[str]) -> None:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECTS_AT_ONCE)
    transports: list[WSTransport] = []

    async def one(strategy: str) -> Client:
        async with gate:
            transport, listener = await ws_connect(lambda: Client(strategy), url, websocket_handshake_timeout=30)
            transports.append(transport)
            client = cast(Client, listener)
            await asyncio.wait_for(client.subscribed, 60)
            return client

    try:
        clients = await asyncio.gather(*(one(s) for s in strategies))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the run
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", sum(c.retries for c in clients)))
    message = await loop.run_in_executor(None, conn.recv)
    errors = [c.error for c in clients if c.error]
    if errors:
        conn.send(("failed", f"{len(errors)} clients saw errors, e.g. {errors[0]}"))
    else:
        conn.send(("report", summarise(clients, message[1])))
    for transport in transports:
        transport.disconnect()


def run(conn: Connection) -> None:
    """A client process's body (multiprocessing target)."""
    _, url, strategies = conn.recv()
    try:
        import uvloop
    except ImportError:
        asyncio.run(_clients(conn, url, strategies))
    else:
        uvloop.run(_clients(conn, url, strategies))
