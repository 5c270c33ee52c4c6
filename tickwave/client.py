"""A Python client for the edge's WebSocket protocol: typed events, reconnect, resume.

    async for event in subscribe("http://127.0.0.1:8000", "volume_wave"):
        ...

yields one typed event per price row (`PriceEvent`, a `PriceItem` with its event id) and
per signal change (`SignalEvent`), one `BreadthEvent` per market breadth computation on a
`subscription_type="market"` subscription, plus what a client must act on: the list to start from
(`Snapshot`), a resume that worked (`Resumed`) or could not (`ResumeLost`, with the
snapshot that replaces the list), and a dropped connection (`Disconnected`, with the
delay before the next try). It reconnects by itself with exponential backoff and jitter
and resumes after the last event it yielded, in that event's epoch.

It imports only schemas and aiohttp, so an app can use it without the server's packages
(tests/test_architecture.py checks it). See docs/client.md.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from pydantic import ValidationError

from schemas.events import Signal, SignalChange
from schemas.messages import MarketRow, PriceItem

log = logging.getLogger("tickwave.client")

WS_PATH = "/ws/stock/prices"
MAX_FRAME = 16 << 20  # a whole-market snapshot is about 1.5 MB
CLOSE_AUTH = 4001
# answers that no retry can change: refuse instead of reconnecting forever
_PERMANENT_CODES = {401, 403, 404, "bad_message", "unknown_strategy"}
# HTTP answers to the upgrade worth retrying: a node full or restarting, a load balancer without a node
_TRANSIENT_STATUS = {429, 502, 503, 504}


class ClientError(Exception):
    """Root of what the client raises: a refusal no reconnect can change."""


class AuthRejected(ClientError):
    """The edge refused the token (close 4001): missing, expired, or not valid for it."""


class SubscribeRefused(ClientError):
    """The edge answered the subscribe with an error that a retry would not change."""

    def __init__(self, code: str | int, message: str, details: Any = None):
        super().__init__(f"{message} ({code})")
        self.code, self.message, self.details = code, message, details


# --- what the iteration yields ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PriceEvent:
    """One price change: `item` is the old client's row (code, price, change_percent, ...)."""

    event_id: str
    epoch: str | None
    target: str
    item: PriceItem


@dataclass(frozen=True, slots=True)
class SignalEvent:
    """A signal added to or removed from the strategy's list."""

    event_id: str
    epoch: str | None
    target: str
    change: SignalChange


@dataclass(frozen=True, slots=True)
class BreadthEvent:
    """One market breadth computation (`market` subscriptions): a row per board and "all"."""

    event_id: str
    epoch: str | None
    target: str
    rows: tuple[MarketRow, ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The latest price of every stock of the target: replace the list with `rows`.
    Events after `event_id` (the newest when the snapshot was taken) follow live.
    On a `market` subscription `rows` is empty and `breadth` holds the latest computation."""

    target: str
    epoch: str | None
    event_id: str | None
    rows: tuple[PriceItem, ...]
    breadth: tuple[MarketRow, ...] = ()


@dataclass(frozen=True, slots=True)
class Resumed:
    """A reconnect (or a `last_event_id` given at start) resumed: every event after
    `after_id` follows, `replayed` of them from history, with no gap and no duplicate."""

    target: str
    epoch: str | None
    after_id: str
    replayed: int


@dataclass(frozen=True, slots=True)
class ResumeLost:
    """`recovered: false`: the events after `after_id` (of `after_epoch`) cannot be replayed
    (the stream was recreated, history has a hole, or too many were missed). Replace the
    list with `snapshot`; live events continue after it."""

    target: str
    after_id: str
    after_epoch: str | None
    snapshot: Snapshot


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection failed or dropped; the next try starts in `retry_in` seconds."""

    reason: str
    attempt: int
    retry_in: float


Event = PriceEvent | SignalEvent | BreadthEvent | Snapshot | Resumed | ResumeLost | Disconnected


# --- reconnect policy ------------------------------------------------------------------

@dataclass(frozen=True)
class Backoff:
    """Delay before reconnect try `attempt` (0-based): `base * 2**attempt`, at most `cap`,
    less a random share of up to `jitter` of it, so that clients dropped together by a
    restarting node do not all come back in the same instant."""

    base: float = 0.5
    cap: float = 30.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base or not 0 <= self.jitter <= 1:
            raise ValueError("backoff needs 0 < base <= cap and 0 <= jitter <= 1")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        full = min(self.cap, self.base * 2 ** min(attempt, 62))
        return full * (1 - self.jitter * (rng or random).random())


TokenSource = str | Callable[[], str | Awaitable[str]]


def ws_url(url: str) -> str:
    """The WebSocket address from an edge's base URL (http, https, ws or wss); a URL
    without a path gets the protocol's path."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"not an edge address: {url!r} (e.g. http://127.0.0.1:8000)")
    path = parts.path if parts.path not in ("", "/") else WS_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


class _Retry(Exception):
    """This connection is over; reconnect after a backoff."""


@dataclass
class Subscription:
    """One subscription that outlives connections. Iterate it (once) for events; `last_event_id`
    and `epoch` are where it would resume (keep them to resume in a later run); `close()`
    ends the iteration from anywhere, `aclose()` also closes the connection at once."""

    url: str
    target: str
    subscription_type: Literal["strategy", "market"] = "strategy"
    last_event_id: str | None = None
    epoch: str | None = None
    token: TokenSource | None = None
    token_in: Literal["header", "query"] = "header"
    backoff: Backoff = field(default_factory=Backoff)
    heartbeat: float | None = 15.0
    connect_timeout: float = 10.0
    rng: random.Random | None = None
    connections: int = 0  # connections that reached `subscribed`, for tests and status lines
    _stop: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    _iterator: AsyncGenerator[Event, None] | None = field(default=None, init=False, repr=False)
    _ws_url: str = field(init=False, repr=False)
    _request_id: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self._ws_url = ws_url(self.url)
        if self.epoch is not None and self.last_event_id is None:
            raise ValueError("an epoch without a last_event_id means nothing to resume")

    def close(self) -> None:
        """Stop: the iteration ends after the event in hand, the connection is closed."""
        self._stop.set()

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    async def __aenter__(self) -> Subscription:
        return self

    async def aclose(self) -> None:
        """Stop, and once the iteration is not running, close its connection now (after a
        `break`, say) rather than when the event loop shuts down."""
        self.close()
        it = self._iterator
        if it is not None and not getattr(it, "ag_running", False):
            await it.aclose()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[Event]:
        if self._iterator is not None:
            raise RuntimeError("a subscription is iterated once")
        self._iterator = self._run()
        return self._iterator

    async def _token(self) -> str | None:
        if self.token is None or isinstance(self.token, str):
            return self.token
        got = self.token()  # a callable, so an expiring token is fetched anew per connection
        return await got if inspect.isawaitable(got) else got

    async def _run(self) -> AsyncGenerator[Event, None]:
        attempt = 0
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
            while not self._stop.is_set():
                try:
                    async for event in self._connection(session):
                        attempt = 0  # every event comes after a subscribe succeeded
                        yield event
                    if self._stop.is_set():
                        return
                    reason = "connection closed"
                except _Retry as exc:
                    reason = str(exc)
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                if self._stop.is_set():
                    return
                delay = self.backoff.delay(attempt, self.rng)
                attempt += 1
                log.info("disconnected", extra={"target": self.target, "reason": reason, "retry_in": delay})
                yield Disconnected(reason, attempt, delay)
                try:
                    await asyncio.wait_for(self._stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass

    async def _connection(self, session: aiohttp.ClientSession) -> AsyncGenerator[Event, None]:
        """One connection: subscribe (resuming when there is an id), then events until it ends."""
        url, headers = self._ws_url, {}
        token = await self._token()
        if token and self.token_in == "query":
            url += ("&" if "?" in url else "?") + "token=" + token
        elif token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            ws = await asyncio.wait_for(
                session.ws_connect(url, headers=headers, heartbeat=self.heartbeat, max_msg_size=MAX_FRAME),
                self.connect_timeout)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in _TRANSIENT_STATUS:
                raise _Retry(f"edge answered {exc.status}: {exc.message}") from None
            raise SubscribeRefused(exc.status, f"edge refused the connection: {exc.message}") from None
        watcher = asyncio.create_task(self._close_on_stop(ws))
        try:
            self._request_id += 1
            request_id = self._request_id
            resume_from, resume_epoch = self.last_event_id, self.epoch
            await ws.send_str(json.dumps({
                "type": "subscribe", "subscription_type": self.subscription_type, "target": self.target,
                "last_event_id": resume_from, "epoch": resume_epoch, "id": request_id}))
            # after a `subscribed` without recovery a snapshot follows; the resume point moves to
            # the server's newest id only once that snapshot is yielded, so a connection lost in
            # between asks for the same resume again and the loss is still reported
            snapshot_at: tuple[str | None, str | None] | None = None  # (epoch, event id)
            while True:
                msg = await ws.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    if self._stop.is_set():
                        return
                    if ws.close_code == CLOSE_AUTH:
                        raise AuthRejected(_close_reason(msg) or "token refused")
                    raise _Retry(_ended(msg, ws))
                doc = json.loads(msg.data)
                kind = doc.get("type")
                if kind == "subscribed" and doc.get("id") == request_id:
                    self.connections += 1
                    if resume_from and doc.get("recovered"):
                        self.epoch = doc.get("epoch")
                        yield Resumed(self.target, self.epoch, resume_from, int(doc.get("replayed", 0)))
                    else:
                        snapshot_at = (doc.get("epoch"), doc.get("event_id"))
                elif kind in ("price_update", "market_update") and doc.get("target") == self.target:
                    rows, breadth = (_rows(doc), ()) if kind == "price_update" else ((), _breadth(doc))
                    if doc.get("snapshot"):
                        if snapshot_at is None:
                            continue  # not ours: a snapshot only answers our subscribe
                        snap = Snapshot(self.target, snapshot_at[0], snapshot_at[1], tuple(rows), tuple(breadth))
                        self.epoch, self.last_event_id = snapshot_at
                        snapshot_at = None
                        yield ResumeLost(self.target, resume_from, resume_epoch, snap) if resume_from else snap
                        continue
                    epoch = doc.get("epoch", self.epoch)
                    if kind == "market_update":
                        self._seen(doc["event_id"])
                        yield BreadthEvent(doc["event_id"], epoch, self.target, tuple(breadth))
                        continue
                    for row in rows:
                        event_id = row.event_id or ""
                        self._seen(event_id)  # before the yield: a consumer that stops here has it
                        yield PriceEvent(event_id, epoch, self.target, row)
                elif kind == "signal_update" and doc.get("target") == self.target:
                    try:
                        change = SignalChange(action=doc["action"], signal=Signal.model_validate(doc["data"][0]))
                    except (KeyError, IndexError, ValidationError) as exc:
                        raise _Retry(f"unreadable signal_update: {exc}") from None
                    self._seen(doc["event_id"])
                    yield SignalEvent(doc["event_id"], self.epoch, self.target, change)
                elif kind == "error":
                    self._error(doc, request_id)
        finally:
            watcher.cancel()
            if not ws.closed:
                await ws.close()

    def _seen(self, event_id: str) -> None:
        # frames of one read carry price rows before that read's signal changes, so an id can be
        # lower than one yielded before it: resume after the highest, which was yielded too
        if self.last_event_id is None or _key(event_id) > _key(self.last_event_id):
            self.last_event_id = event_id

    def _error(self, doc: dict[str, Any], request_id: int) -> None:
        code, message = doc.get("code"), str(doc.get("error", "error"))
        if doc.get("id") != request_id:
            log.warning("edge error", extra={"target": self.target, "code": code, "error": message})
            return
        if code in _PERMANENT_CODES:
            raise SubscribeRefused(code if code is not None else "error", message, doc.get("details"))
        raise _Retry(f"subscribe failed: {message} ({code})")

    async def _close_on_stop(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        await self._stop.wait()
        await ws.close()


def _rows(doc: dict[str, Any]) -> list[PriceItem]:
    try:
        return [PriceItem.model_validate(row) for row in doc["data"]]
    except (KeyError, TypeError, ValidationError) as exc:
        raise _Retry(f"unreadable price_update: {exc}") from None


def _breadth(doc: dict[str, Any]) -> list[MarketRow]:
    try:
        if not doc.get("snapshot") and not isinstance(doc.get("event_id"), str):
            raise ValueError("a live market_update without its event_id")
        return [MarketRow.model_validate(r) for r in doc["data"]]
    except (KeyError, TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        raise _Retry(f"unreadable market_update: {exc}") from None


def _key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def _close_reason(msg: aiohttp.WSMessage) -> str:
    return msg.extra if isinstance(msg.extra, str) and msg.extra else ""


def _ended(msg: aiohttp.WSMessage, ws: aiohttp.ClientWebSocketResponse) -> str:
    if msg.type == aiohttp.WSMsgType.ERROR:
        return f"connection error: {ws.exception() or msg.data}"
    reason = _close_reason(msg)
    return f"closed by the edge ({ws.close_code}{': ' + reason if reason else ''})"


def subscribe(
    url: str,
    target: str,
    *,
    last_event_id: str | None = None,
    epoch: str | None = None,
    token: TokenSource | None = None,
    token_in: Literal["header", "query"] = "header",
    backoff: Backoff | None = None,
    heartbeat: float | None = 15.0,
    subscription_type: Literal["strategy", "market"] = "strategy",
) -> Subscription:
    """Subscribe to `target` on the edge at `url` (e.g. http://127.0.0.1:8000); iterate the
    result for events. With `last_event_id` (and the `epoch` it came from), start by resuming
    after it. `token` (a JWT, or a function returning one per connection) is sent as an
    `Authorization: Bearer` header, or as `?token=` with token_in="query". `heartbeat`:
    seconds between pings; a connection that answers none within half of it is dropped and
    resumed elsewhere (None: rely on TCP)."""
    return Subscription(url, target, subscription_type=subscription_type, last_event_id=last_event_id,
                        epoch=epoch, token=token, token_in=token_in, backoff=backoff or Backoff(),
                        heartbeat=heartbeat)
