"""WebSocket client fleet for bench.pipeline (c) and bench.edge (a), in processes of their own:
picows connections, each subscribed to one target, noting every live price row's event id and
the time its frame arrived. Two protocols: tickwave's (`/ws`) and Socket.IO's (engine.io v4 over
a bare WebSocket: `0` open, `40` connect, `42[...]` events, `2`/`3` ping and pong), so the
python-socketio peer is measured by the very same clients.

picows (Cython; frames handed to a callback, no per-frame task or future) rather than aiohttp's
client or python-socketio's own: the clients share the machine's 2 cores with Redis and the
server measured, and every microsecond they spend per frame is taken from what is measured.
They run on uvloop when it is installed (the `bench` extra).

The parent drives a process through a Pipe: it sends ("start", url, targets, protocol), gets
("ready", retries) once all its clients are subscribed (and how many subscribes had to be
resent), later sends ("report", phases), one {target: {event id: reference ms}} per timed
phase (the exact content of the stream in that phase, each event with the time latency is
measured from: its tick time, its append time), and gets back one `PhaseResult` per phase.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, cast

import orjson
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

CONNECTS_AT_ONCE = 50
RETRIES = 5  # subscribes resent after an `unavailable` answer (the edge says: retry shortly)
TICKWAVE, SOCKETIO = "tickwave", "socketio"


@dataclass
class PhaseResult:
    """What this process's clients saw of one phase's events."""

    latencies_ms: array  # type: ignore[type-arg]  # one per (client, event) delivered: reference -> frame
    delivered: int
    lost: int  # events of the client's target in the phase that it never received
    duplicated: int  # deliveries beyond the first of the same event
    clients_with_loss: int
    close_codes: Counter[str] = field(default_factory=Counter)  # connections closed by the server, by code


class Client(WSListener):  # type: ignore[misc]
    def __init__(self, target: str, protocol: str):
        self.target, self.protocol = target, protocol
        if protocol == SOCKETIO:  # an event with ack id 0
            self.subscribe = b'420' + orjson.dumps(["subscribe", {"target": target}])
        else:
            self.subscribe = orjson.dumps({"type": "subscribe", "target": target})
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ids: list[str] = []
        self.arrivals = array("d")  # ms, one per id
        self.transport: WSTransport | None = None
        self.error: str | None = None
        self.retries = 0
        self.close_code: str | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            self.close_code = str(int(frame.get_close_code()))
            return
        if frame.msg_type != WSMsgType.TEXT:
            return  # picows answers pings itself
        now_ms = time.time() * 1000
        if not frame.fin:  # aiohttp sends every message as one frame
            self.error = "fragmented frame"
            return
        payload = frame.get_payload_as_bytes()
        if self.protocol == SOCKETIO:
            self.on_engineio(transport, payload, now_ms)
            return
        doc: dict[str, Any] = orjson.loads(payload)
        kind = doc.get("type")
        if kind == "price_update":
            if not doc.get("snapshot"):
                self.on_prices(doc, now_ms)
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
            self.fail(str(doc))

    def on_prices(self, doc: dict[str, Any], now_ms: float) -> None:
        for row in doc["data"]:
            self.ids.append(row["event_id"])
            self.arrivals.append(now_ms)

    def on_engineio(self, transport: WSTransport, payload: bytes, now_ms: float) -> None:
        if payload.startswith(b"42"):  # a Socket.IO event on the default namespace
            name, doc = orjson.loads(payload[2:])
            if name == "price_update":
                self.on_prices(doc, now_ms)
        elif payload == b"2":
            transport.send(WSMsgType.TEXT, b"3")
        elif payload.startswith(b"0"):  # engine.io open: connect to the default namespace
            transport.send(WSMsgType.TEXT, b"40")
        elif payload.startswith(b"40"):
            transport.send(WSMsgType.TEXT, self.subscribe)
        elif payload.startswith(b"430"):  # the subscribe's ack
            if not self.subscribed.done():
                self.subscribed.set_result(None)
        elif payload.startswith(b"44"):
            self.fail(payload.decode(errors="replace"))

    def fail(self, why: str) -> None:
        self.error = why
        if not self.subscribed.done():
            self.subscribed.set_exception(RuntimeError(f"subscribe refused: {why}"))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.close_code is None:
            self.close_code = "no close frame"
        if not self.subscribed.done():
            self.subscribed.set_exception(RuntimeError("disconnected before subscribing"))


def summarise(clients: list[Client], phases: list[dict[str, dict[str, float]]]) -> list[PhaseResult]:
    """Each phase's deliveries against the exact ids its targets' streams got in it."""
    out = []
    closed = Counter(c.close_code for c in clients if c.close_code is not None)
    for expected in phases:
        lat = array("d")
        delivered = lost = duplicated = with_loss = 0
        for c in clients:
            mine = expected.get(c.target, {})
            seen: set[str] = set()
            for eid, arrived in zip(c.ids, c.arrivals):
                reference = mine.get(eid)
                if reference is None:
                    continue
                if eid in seen:
                    duplicated += 1
                    continue
                seen.add(eid)
                lat.append(arrived - reference)
            delivered += len(seen)
            missing = len(mine) - len(seen)
            lost += missing
            with_loss += missing > 0
        out.append(PhaseResult(lat, delivered, lost, duplicated, with_loss, closed))
    return out


async def _clients(conn: Connection, url: str, targets: list[str], protocol: str) -> None:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECTS_AT_ONCE)
    transports: list[WSTransport] = []

    async def one(target: str) -> Client:
        async with gate:
            transport, listener = await ws_connect(lambda: Client(target, protocol), url,
                                                   websocket_handshake_timeout=30)
            transports.append(transport)
            client = cast(Client, listener)
            await asyncio.wait_for(client.subscribed, 60)
            return client

    try:
        clients = await asyncio.gather(*(one(t) for t in targets))
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
        transport.send_close(WSCloseCode.OK)
        transport.disconnect()


def run(conn: Connection) -> None:
    """A client process's body (multiprocessing target)."""
    _, url, targets, protocol = conn.recv()
    try:
        import uvloop
    except ImportError:
        asyncio.run(_clients(conn, url, targets, protocol))
    else:
        uvloop.run(_clients(conn, url, targets, protocol))


# --- the parent's side ---------------------------------------------------------------------

@dataclass
class Delivered:
    """A phase's results over every client process."""

    latencies_ms: array = field(default_factory=lambda: array("d"))  # type: ignore[type-arg]
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    clients_with_loss: int = 0
    close_codes: Counter[str] = field(default_factory=Counter)

    def add(self, got: PhaseResult) -> None:
        self.latencies_ms.extend(got.latencies_ms)
        self.delivered += got.delivered
        self.lost += got.lost
        self.duplicated += got.duplicated
        self.clients_with_loss += got.clients_with_loss
        self.close_codes.update(got.close_codes)

    def ordered(self) -> list[float]:
        if not hasattr(self, "_ordered"):
            self._ordered = sorted(self.latencies_ms)
        return self._ordered

    def closes(self) -> str:
        return ", ".join(f"{n} x {code}" for code, n in sorted(self.close_codes.items())) or "none"


class Fleet:
    """`procs` client processes sharing `targets` (one client each), spoken to through pipes."""

    def __init__(self, url: str, targets: list[str], procs: int, protocol: str = TICKWAVE):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.children: list[Any] = []
        for i in range(procs):
            mine, theirs = ctx.Pipe()
            child = ctx.Process(target=run, args=(theirs,), daemon=True)
            child.start()
            mine.send(("start", url, targets[i::procs], protocol))
            self.pipes.append(mine)
            self.children.append(child)

    def pids(self) -> dict[str, int]:
        return {f"clients {i + 1}": c.pid for i, c in enumerate(self.children) if c.pid is not None}

    async def _answer(self, conn: Connection, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        if not await loop.run_in_executor(None, conn.poll, timeout):
            raise RuntimeError(f"a client process did not answer in {timeout:.0f} s")
        reply = conn.recv()
        if reply[0] == "failed":
            raise RuntimeError(f"a client process failed: {reply[1]}")
        return reply

    async def ready(self, timeout: float = 180) -> int:
        """Once every client is subscribed: how many subscribes were resent."""
        return sum(r[1] for r in await asyncio.gather(*(self._answer(c, timeout) for c in self.pipes)))

    async def report(self, phases: list[dict[str, dict[str, float]]]) -> list[Delivered]:
        for conn in self.pipes:
            conn.send(("report", phases))
        out = [Delivered() for _ in phases]
        for _, results in await asyncio.gather(*(self._answer(c, 120) for c in self.pipes)):
            for total, got in zip(out, results):
                total.add(got)
        return out

    def close(self) -> None:
        for child in self.children:
            child.join(5)
            if child.is_alive():
                child.terminate()
                child.join(5)
