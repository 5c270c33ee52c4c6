"""The WebSocket endpoint: the old client's protocol, extended for resume (see DESIGN.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid

from aiohttp import WSCloseCode, WSMsgType, web

from edge import klines, metrics
from edge.auth import OPEN, AuthError, Grant, token_from
from edge.conn import Outgoing, Sender
from edge.frames import batch_of, price_update
from edge.hub import NodeFull
from edge.klines import KlineSub
from edge.market import snapshot_frame
from edge.subscription import Subscription, outgoing
from edge.limits import TokenBucket
from edge.state import EdgeState, state_key
from schemas.market import InvalidCode, parse_ts_code
from schemas.messages import (
    Connected,
    ErrorCode,
    Ping,
    Pong,
    ProtocolError,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    parse_client_message,
    price_row,
)
from streams.codec import parse_id
from streams.errors import StreamsError
from streams.history import history
from streams.keys import check_name

log = logging.getLogger("tickwave.edge")

CLOSE_AUTH = 4001
CLOSE_LIMIT = 4029


def _refuse(reason: str) -> None:
    metrics.REFUSALS.labels(reason).inc()


class Session:
    """One connected client: its subscriptions and what it is allowed."""

    def __init__(
        self, state: EdgeState, ws: web.WebSocketResponse, grant: Grant, client_id: str,
        transport: asyncio.Transport | None,
    ):
        self.state, self.ws, self.grant, self.client_id = state, ws, grant, client_id
        s = state.settings
        self.sender = Sender(ws, client_id, s.edge_send_queue_bytes, transport=transport)
        self.bucket = TokenBucket(s.edge_rate_per_s, s.edge_rate_burst)
        self.subs: dict[tuple[str, str], Subscription] = {}
        self.klines: dict[tuple[str, str], KlineSub] = {}  # (ts_code, interval) -> edge/klines.py

    def error(self, exc: ProtocolError) -> None:
        self.sender.send(exc.to_message())

    async def handle(self, text: str) -> bool:
        """Handle one frame; False when the connection must close."""
        if not self.bucket.allow():
            _refuse("rate_limited")
            self.error(ProtocolError(ErrorCode.RATE_LIMITED, "too many messages per second",
                                     {"rate_per_s": self.state.settings.edge_rate_per_s}))
            await self.sender.flush()
            await self.ws.close(code=CLOSE_LIMIT, message=b"rate limit exceeded")
            return False
        try:
            msg = parse_client_message(text)
            if isinstance(msg, Ping):
                self.sender.send(Pong(id=msg.id))
            elif isinstance(msg, Subscribe):
                try:
                    return await self.subscribe(msg)
                except StreamsError as exc:
                    # Redis or PostgreSQL unavailable mid-subscribe: say so, keep the connection
                    await self._drop(msg)
                    log.warning("subscribe failed: store unavailable",
                                extra={"client_id": self.client_id, "target": msg.target, "error": str(exc)})
                    raise ProtocolError(ErrorCode.UNAVAILABLE, "history is unavailable right now; retry shortly",
                                        None, msg.id) from None
            elif isinstance(msg, Unsubscribe):
                await self.unsubscribe(msg)
        except ProtocolError as exc:
            _refuse(f"bad_frame:{exc.code}")
            log.info("bad frame", extra={"client_id": self.client_id, "code": exc.code, "error": exc.error})
            self.error(exc)
        return True

    def _target(self, msg: Subscribe | Unsubscribe) -> tuple[str, str]:
        if msg.subscription_type == "stock":
            try:
                return msg.target, parse_ts_code(msg.target)
            except InvalidCode as exc:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, str(exc), {"field": "target"}, msg.id) from None
        # the market summary is one stream under the reserved strategy name `market`
        target = "market" if msg.subscription_type == "market" else msg.target
        try:
            check_name(target, "strategy")
        except ValueError as exc:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, str(exc), {"field": "target"}, msg.id) from None
        return target, ""

    def subscriptions(self) -> int:
        return len(self.subs) + len(self.klines)

    async def too_many(self, msg: Subscribe) -> bool:
        """Refuse a subscription past the limit: an error, then close 4029; False."""
        _refuse("too_many_subscriptions")
        self.error(ProtocolError(ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                                 f"at most {self.state.settings.edge_max_subscriptions} subscriptions", None, msg.id))
        await self.sender.flush()
        await self.ws.close(code=CLOSE_LIMIT, message=b"too many subscriptions")
        return False

    async def subscribe(self, msg: Subscribe) -> bool:
        if msg.subscription_type == "kline":
            try:
                return await klines.subscribe(self, msg)
            except NodeFull:
                _refuse("node_full")
                raise ProtocolError(ErrorCode.NODE_FULL,
                                    f"this node follows its maximum of {self.state.settings.edge_max_tails} streams; "
                                    "try another node", {"target": msg.target}, msg.id) from None
        target, code = self._target(msg)
        if msg.subscription_type != "stock" and not self.grant.allows(target):
            _refuse("forbidden")
            raise ProtocolError(ErrorCode.FORBIDDEN, f"this token may not subscribe to {target!r}",
                                {"target": target}, msg.id)
        if msg.subscription_type != "stock" and not await self.state.events.is_strategy(target):
            # checked before anything is created: a made-up name leaves no key, group, reader or label
            _refuse("unknown_strategy")
            raise ProtocolError(ErrorCode.UNKNOWN_STRATEGY, f"no such strategy {target!r}: it has no events yet",
                                {"target": target}, msg.id)
        key = (msg.subscription_type, target)
        if key in self.subs:
            await self.state.hub.leave(self.subs.pop(key))
        elif self.subscriptions() >= self.state.settings.edge_max_subscriptions:
            return await self.too_many(msg)
        sub = Subscription(msg.subscription_type, target, self.sender, code=code)
        try:
            await self.state.hub.join(sub)  # live events buffer from here on
        except NodeFull:
            _refuse("node_full")
            raise ProtocolError(ErrorCode.NODE_FULL,
                                f"this node follows its maximum of {self.state.settings.edge_max_tails} streams; "
                                "try another node", {"target": target}, msg.id) from None
        self.subs[key] = sub
        if msg.subscription_type == "stock":
            self.sender.send(Subscribed(subscription_type="stock", target=msg.target, id=msg.id))
            return True
        await self._replay_or_snapshot(sub, msg)
        return True

    async def _replay_or_snapshot(self, sub: Subscription, msg: Subscribe) -> None:
        st = self.state
        target = sub.target
        limit = st.settings.edge_max_replay
        if msg.last_event_id:
            got = await history(st.events, st.archive, target, epoch=msg.epoch, after_id=msg.last_event_id,
                                limit=limit)
            if got.covered and not got.truncated:
                metrics.RESUMES.labels("true").inc()
                metrics.REPLAYED.inc(len(got.events))
                last = got.events[-1].id if got.events else msg.last_event_id
                self.sender.send(Subscribed(
                    subscription_type=msg.subscription_type, target=target, epoch=got.epoch, event_id=last,
                    recovered=True, replayed=len(got.events), id=msg.id))
                for start in range(0, len(got.events), 500):
                    batch, _ = batch_of(target, got.epoch, got.events[start:start + 500], latency=False)
                    if batch is not None:
                        for item in outgoing(batch):
                            # backpressure, not conflation: a replay must arrive whole
                            if not await self.sender.wait_room(len(item.text)):
                                return
                            item.kind = "replay" if item.kind == "price_update" else item.kind
                            self.sender.put(item, may_conflate=False)
                sub.go_live(parse_id(last))
                return
            metrics.RESUMES.labels("false").inc()
            log.info("resume not covered", extra={"client_id": self.client_id, "target": target,
                                                  "reason": got.reason or "too_many_events"})
        await self._snapshot(sub, msg)

    async def _snapshot(self, sub: Subscription, msg: Subscribe) -> None:
        st = self.state
        epoch = await st.events.epoch(sub.target)
        if sub.kind == "market":
            # breadth's snapshot is the newest entry itself
            newest = await st.events.latest(sub.target)
            self.sender.send(Subscribed(subscription_type="market", target=sub.target, epoch=epoch,
                                        event_id=newest.id if newest else None, id=msg.id))
            frame = snapshot_frame(sub.target, epoch, newest)
            if frame is not None:
                self.sender.put(Outgoing(frame, "market_update"))
            sub.go_live(parse_id(newest.id) if newest else None)
            return
        # the newest id first, then the snapshot: an event appended in between is then both
        # in the snapshot and sent live (harmless), never in neither
        latest = await st.events.latest_id(sub.target)
        snap = await st.events.snapshot(sub.target)
        rows = [price_row(s.id, s.doc()) for s in snap]
        self.sender.send(Subscribed(subscription_type=msg.subscription_type, target=sub.target, epoch=epoch,
                                    event_id=latest, id=msg.id))
        self.sender.put(Outgoing(price_update(sub.target, epoch, rows, snapshot=True), "price_update"))
        sub.go_live(parse_id(latest) if latest else None)

    async def _drop(self, msg: Subscribe) -> None:
        """Forget a subscription that could not be set up."""
        if msg.subscription_type == "kline":
            return  # edge/klines.py forgets its own
        sub = self.subs.pop((msg.subscription_type, self._target(msg)[0]), None)
        if sub is not None:
            await self.state.hub.leave(sub)

    async def unsubscribe(self, msg: Unsubscribe) -> None:
        if msg.subscription_type == "kline":
            return await klines.unsubscribe(self, msg)
        target, _ = self._target(msg)
        sub = self.subs.pop((msg.subscription_type, target), None)
        if sub is not None:
            await self.state.hub.leave(sub)
        self.sender.send(Unsubscribed(subscription_type=msg.subscription_type, target=msg.target, id=msg.id))

    async def going_away(self) -> None:
        """The server is stopping: close with 1001 now, without waiting on a client that does not read."""
        await self.sender.stop()
        with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
            await asyncio.wait_for(
                self.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down", drain=False), 1.0)

    async def close(self) -> None:
        for sub in self.subs.values():
            await self.state.hub.leave(sub)
        self.subs.clear()
        for kline in self.klines.values():
            await self.state.hub.klines.leave(kline)
        self.klines.clear()
        await self.sender.stop()


async def websocket(request: web.Request) -> web.StreamResponse:
    state = request.app[state_key]
    s = state.settings
    origin = request.headers.get("Origin")
    if s.origins and origin not in s.origins:
        _refuse("origin")
        return web.json_response({"error": "origin not allowed", "origin": origin}, status=403)
    address = request.remote or "unknown"
    if not state.addresses.acquire(address):
        _refuse("connections_per_ip")
        return web.json_response({"error": "too many connections from this address",
                                  "limit": s.edge_max_connections_per_ip}, status=429)
    ws = web.WebSocketResponse(heartbeat=s.edge_heartbeat_s, max_msg_size=s.edge_max_frame_bytes,
                               compress=s.edge_ws_compress)
    session: Session | None = None
    try:
        grant = OPEN
        auth_error = None
        if state.verifier is not None:
            try:
                grant = state.verifier.verify(token_from(dict(request.query), request.headers.get("Authorization")))
            except AuthError as exc:
                auth_error = str(exc)
        await ws.prepare(request)
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, s.edge_socket_sndbuf)
        if auth_error is not None:
            _refuse("auth")
            log.info("auth refused", extra={"remote": address, "error": auth_error})
            await ws.send_json({"type": "error", "error": auth_error, "details": None, "code": 401})
            await ws.close(code=CLOSE_AUTH, message=auth_error.encode()[:120])
            return ws
        client_id = uuid.uuid4().hex[:12]
        session = Session(state, ws, grant, client_id, request.transport)  # type: ignore[arg-type]
        state.sessions.add(session)
        metrics.CONNECTIONS.inc()
        session.sender.send(Connected(client_id=client_id, heartbeat=s.edge_heartbeat_s, node=s.edge_node))
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                if not await session.handle(msg.data):
                    break
            elif msg.type == WSMsgType.BINARY:
                _refuse("bad_frame:binary")
                session.error(ProtocolError(ErrorCode.BAD_MESSAGE, "binary frames are not supported; send JSON text"))
            elif msg.type == WSMsgType.ERROR:
                # e.g. a frame over max_msg_size: aiohttp has already closed with 1009
                _refuse("frame_too_large" if ws.close_code == WSCloseCode.MESSAGE_TOO_BIG else "ws_error")
                break
        return ws
    finally:
        state.addresses.release(address)
        if session is not None:
            metrics.CONNECTIONS.dec()
            state.sessions.discard(session)
            await session.close()
