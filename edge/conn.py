"""One client connection's outbound side: a send queue bounded in bytes, conflation, 4008.

Fan-out only appends here and never awaits the socket, so one slow client cannot delay
the others. A frame for a connection with nothing queued is written straight to its
transport (a frame shared by every subscriber of a batch is framed once, `Outgoing.frame`);
only a connection with a backlog gets a writer task, which drains its queue and ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from edge import metrics
from edge.frames import price_update, ws_frame
from schemas.messages import ServerMessage

log = logging.getLogger("tickwave.edge")

CLOSE_SLOW = 4008
#: the stream lost, in a failover, ids this client was sent: resubscribe with the last id held,
#: and the answer is recovered: false with a snapshot
CLOSE_RESYNC = 4012
# conflating this many times without the queue ever draining means the client cannot keep up
MAX_CONFLATIONS_WITHOUT_DRAIN = 3
# a frame goes straight to the transport while the kernel has taken nearly all that was written;
# past this the connection is backlogged and its queue (cap, conflation, 4008) takes over
DIRECT_MAX_BUFFERED = 64 * 1024


@dataclass(eq=False)
class Outgoing:
    text: str
    kind: str
    ingest_ms: float | None = None
    # set for price updates, so they can be conflated: (target, epoch, rows)
    prices: tuple[str, str | None, list[dict[str, Any]]] | None = None
    # one object put to many connections: its direct writes are counted in bulk (`account`)
    shared: bool = False
    written: int = 0
    _payload: bytes | None = None
    _frame: bytes | None = None

    def payload(self) -> bytes:
        if self._payload is None:
            self._payload = self.text.encode()
        return self._payload

    def frame(self) -> bytes:
        """The whole WebSocket text frame (server frames are unmasked: the same bytes for every client)."""
        if self._frame is None:
            self._frame = ws_frame(self.payload())
        return self._frame


def account(item: Outgoing, n: int) -> None:
    """Metrics of `n` sends of one frame, at once (a shared frame goes to hundreds of clients)."""
    if n <= 0:
        return
    metrics.MESSAGES_SENT.labels(item.kind).inc(n)
    metrics.BYTES_SENT.inc(n * len(item.payload()))
    if item.ingest_ms is not None:
        metrics.observe_many(metrics.PUSH_LATENCY, max(0.0, time.time() - item.ingest_ms / 1000), n)


def account_shared(items: Iterable[Outgoing]) -> None:
    """Count the direct writes of shared frames made since the last call."""
    for item in items:
        account(item, item.written)
        item.written = 0


def conflate(queue: Iterable[Outgoing]) -> deque[Outgoing]:
    """Control frames and replays kept in order; every queued live price update collapsed into
    one frame per target at the end, holding the latest row per stock (in order of recency)."""
    latest: dict[str, dict[str, dict[str, Any]]] = {}
    epochs: dict[str, str | None] = {}
    ingest: dict[str, float | None] = {}
    kept: deque[Outgoing] = deque()
    for item in queue:
        if item.prices is None or item.kind == "replay":
            kept.append(item)
            continue
        target, epoch, rows = item.prices
        per_stock = latest.setdefault(target, {})
        for row in rows:
            per_stock.pop(row["ts_code"], None)  # re-insert: dict order follows recency
            per_stock[row["ts_code"]] = row
        epochs[target] = epoch
        ingest[target] = item.ingest_ms if ingest.get(target) is None else ingest[target]
    for target, rows_by_code in latest.items():
        rows = list(rows_by_code.values())
        kept.append(Outgoing(price_update(target, epochs[target], rows), "price_update",
                             ingest[target], (target, epochs[target], rows)))
    return kept


@dataclass(eq=False)
class Sender:
    ws: web.WebSocketResponse
    client_id: str
    cap_bytes: int
    transport: asyncio.Transport | None = None
    queue: deque[Outgoing] = field(default_factory=deque)
    queued_bytes: int = 0
    conflations: int = 0
    closed: bool = False
    _sent: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        # a compressed connection (permessage-deflate) cannot take a frame framed for everyone
        self.direct = self.transport is not None and not self.ws.compress

    async def stop(self) -> None:
        self.closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the socket is going away
                pass

    async def wait_room(self, size: int, timeout: float = 10.0) -> bool:
        """Wait until `size` more bytes fit under the cap (replays must never be conflated);
        False, and the client closed 4008, if it cannot take them within `timeout`."""
        deadline = time.monotonic() + timeout
        while not self.closed and self.backlog() + size > self.cap_bytes and self.backlog() > 0:
            if time.monotonic() > deadline:
                self._close_slow()
                return False
            self._sent.clear()
            try:
                # woken by the writer after each send; the transport may drain without one
                await asyncio.wait_for(self._sent.wait(), 0.005)
            except asyncio.TimeoutError:
                pass
        return not self.closed

    async def flush(self, timeout: float = 1.0) -> None:
        """Give the writer up to `timeout` to send what is queued (before a deliberate close)."""
        deadline = time.monotonic() + timeout
        while self.queue and not self.closed and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    def send(self, message: ServerMessage) -> None:
        """Queue one control frame, serialised by its schemas.messages model."""
        self.put(Outgoing(message.model_dump_json(), message.type))  # type: ignore[attr-defined]

    def backlog(self) -> int:
        """Bytes not yet handed to the kernel: our queue plus the transport's write buffer."""
        buffered = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return self.queued_bytes + buffered

    def put(self, item: Outgoing, *, may_conflate: bool = True) -> None:
        if self.closed:
            return
        if not self.queue and self._task is None and self.direct and not self.ws.closed:
            transport = self.transport
            assert transport is not None
            buffered = transport.get_write_buffer_size()
            if buffered <= DIRECT_MAX_BUFFERED and not transport.is_closing():
                if buffered == 0:
                    self.conflations = 0  # all sent: the client is keeping up
                transport.write(item.frame())
                if item.shared:
                    item.written += 1
                else:
                    account(item, 1)
                return
        self.queue.append(item)
        self.queued_bytes += len(item.text)
        if may_conflate and self.backlog() > self.cap_bytes:
            self._conflate()
        if self._task is None and not self.closed:
            self._task = asyncio.create_task(self._drain(), name=f"send-{self.client_id}")

    def _conflate(self) -> None:
        self.queue = conflate(self.queue)
        self.queued_bytes = sum(len(i.text) for i in self.queue)
        self.conflations += 1
        metrics.CONFLATIONS.inc()
        if self.backlog() > self.cap_bytes or self.conflations > MAX_CONFLATIONS_WITHOUT_DRAIN:
            self._close_slow()

    def _close_slow(self) -> None:
        self.closed = True
        self.queue.clear()
        self.queued_bytes = 0
        metrics.SLOW_CLOSES.inc()
        log.info("slow client closed", extra={"client_id": self.client_id, "code": CLOSE_SLOW})
        asyncio.ensure_future(self._close_now())

    def close_resync(self) -> None:
        """Close 4012: the client holds ids a failover lost, and must resubscribe to get a snapshot."""
        if self.closed:
            return
        self.closed = True
        self.queue.clear()
        self.queued_bytes = 0
        log.info("client holds lost ids: closed to resubscribe", extra={"client_id": self.client_id,
                                                                        "code": CLOSE_RESYNC})
        asyncio.ensure_future(self._close_now(CLOSE_RESYNC, b"stream lost events in a failover: resubscribe"))

    async def _close_now(self, code: int = CLOSE_SLOW, message: bytes = b"too slow: send queue full") -> None:
        # the close frame cannot overtake the data already buffered for a client that does
        # not read; give it a moment, then drop the connection
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=message, drain=False), 2)
        except (asyncio.TimeoutError, ConnectionError):
            transport = self.transport
            if transport is not None:
                # flush what is buffered (the close frame is last), then the socket closes;
                # a client that never reads again is cut off later
                transport.close()
                asyncio.get_running_loop().call_later(30, transport.abort)

    async def _drain(self) -> None:
        """The writer of a backlogged connection: sends the queue in order (waiting for the
        transport to drain between frames, as aiohttp does), then ends."""
        try:
            while self.queue and not self.closed:
                item = self.queue.popleft()
                self.queued_bytes -= len(item.text)
                await self.ws.send_frame(item.payload(), WSMsgType.TEXT)
                self._sent.set()
                account(item, 1)
        except (ConnectionError, RuntimeError):
            # the socket went away under the writer: the handler's loop ends and closes the session
            self.queue.clear()
            self.queued_bytes = 0
        finally:
            if self._task is asyncio.current_task():
                self._task = None
            if not self.queue and self.backlog() == 0:
                self.conflations = 0
