"""Every WebSocket message of the edge protocol (see DESIGN.md), seed-compatible field names."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import date, datetime
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from schemas.base import Frozen
from schemas.events import BreadthBoard, PriceChange, Signal, Tick
from schemas.klines import Bar, Interval
from schemas.market import SHANGHAI, percent_change

PROTOCOL_VERSION = 2
SubscriptionType = Literal["strategy", "stock", "market", "kline"]
RequestId = str | int | None


class ClientMessage(BaseModel):
    """Inbound frames: unknown extra fields (the old client's timestamps) are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class Subscribe(ClientMessage):
    type: Literal["subscribe"]
    subscription_type: SubscriptionType = "strategy"
    target: str = Field(min_length=1, max_length=64)
    last_event_id: str | None = Field(None, pattern=r"^\d+-\d+$", max_length=41)
    epoch: str | None = Field(None, max_length=64)
    interval: Interval = Field("1m", description="kline subscriptions: the bar interval")
    id: RequestId = None

    @field_validator("last_event_id")
    @classmethod
    def _stream_id(cls, value: str | None) -> str | None:
        # Redis refuses ids past 64 bits: the answer would otherwise be a store error
        if value is not None and any(int(part) >= 1 << 64 for part in value.split("-")):
            raise ValueError("both parts of an event id must be below 2^64")
        return value


class Unsubscribe(ClientMessage):
    type: Literal["unsubscribe"]
    subscription_type: SubscriptionType = "strategy"
    target: str = Field(min_length=1, max_length=64)
    interval: Interval = "1m"
    id: RequestId = None


class Ping(ClientMessage):
    type: Literal["ping"]
    id: RequestId = None


AnyClientMessage = Annotated[Union[Subscribe, Unsubscribe, Ping], Field(discriminator="type")]
_client_adapter: TypeAdapter[Subscribe | Unsubscribe | Ping] = TypeAdapter(AnyClientMessage)


def _now() -> datetime:
    return datetime.now(SHANGHAI)


class ServerMessage(Frozen):
    pass


class Connected(ServerMessage):
    type: Literal["connected"] = "connected"
    client_id: str
    message: str = "connected to tickwave"
    timestamp: datetime = Field(default_factory=_now)
    protocol: int = PROTOCOL_VERSION
    heartbeat: float = Field(description="seconds of silence after which the server closes")
    node: str | None = Field(None, description="the edge node (process) serving this connection")


class Subscribed(ServerMessage):
    type: Literal["subscribed"] = "subscribed"
    subscription_type: SubscriptionType
    target: str
    epoch: str | None = None
    event_id: str | None = Field(None, description="id of the newest event at subscribe time")
    recovered: bool = False
    replayed: int = 0
    interval: Interval | None = Field(None, description="kline subscriptions: the bar interval")
    id: RequestId = None


class Unsubscribed(ServerMessage):
    type: Literal["unsubscribed"] = "unsubscribed"
    subscription_type: SubscriptionType
    target: str
    id: RequestId = None


class PriceItem(Frozen):
    """One row of the old client's list, plus the resume fields."""

    code: str
    ts_code: str
    name: str
    price: float
    change: float
    change_percent: float
    volume: int
    timestamp: datetime
    event_id: str | None = None
    signal_price: float | None = None
    change_since_signal_percent: float | None = None

    @classmethod
    def from_event(cls, event: PriceChange) -> PriceItem:
        return cls.model_validate(price_row(event.event_id, event.model_dump(mode="json")))


def price_row(event_id: str | None, doc: Mapping[str, Any]) -> dict[str, Any]:
    """The `price_update` row (a PriceItem as a dict) from a PriceChange-shaped document: the
    stored event's JSON, or a tick's quote (`quote_doc`). The one builder of price rows; the
    hot paths use it on parsed JSON without building models."""
    code = doc["ts_code"]
    return {
        "code": code.split(".", 1)[0],
        "ts_code": code,
        "name": doc.get("name", ""),
        "price": doc["price"],
        "change": doc["change"],
        "change_percent": doc["change_percent"],
        "volume": doc.get("volume", 0),
        "timestamp": doc["tick_time"],
        "event_id": event_id,
        "signal_price": doc.get("signal_price"),
        "change_since_signal_percent": doc.get("change_since_signal_percent"),
    }


def quote_doc(tick: Tick) -> dict[str, Any]:
    """A tick as a PriceChange-shaped document with no signal: a `stock` subscription's row."""
    return {
        "ts_code": tick.ts_code, "name": tick.name, "price": tick.price,
        "change": round(tick.price - tick.pre_close, 4), "change_percent": percent_change(tick.price, tick.pre_close),
        "volume": tick.volume, "tick_time": tick.time.isoformat(),
    }


class PriceUpdate(ServerMessage):
    type: Literal["price_update"] = "price_update"
    data: list[PriceItem]
    count: int
    target: str
    event_id: str | None = None
    epoch: str | None = None
    snapshot: bool = False


class SignalUpdate(ServerMessage):
    type: Literal["signal_update"] = "signal_update"
    action: Literal["add", "remove"]
    data: list[Signal]
    count: int
    target: str | None = None
    event_id: str | None = None


class KlineUpdate(ServerMessage):
    """Bars of one stock: closed 1-minute bars as they close; a derived interval's bar as each
    of its minutes closes (closed once its last minute is in). event_id: the newest minute's."""

    type: Literal["kline_update"] = "kline_update"
    target: str
    interval: Interval
    epoch: str | None = None
    event_id: str | None = None
    snapshot: bool = False
    data: list[Bar]


class KlineList(Frozen):
    """`GET /api/stocks/{ts_code}/kline` (format=json)."""

    ts_code: str
    interval: Interval
    covered: bool = Field(description="false: bars were trimmed from Redis and the archive cannot show none is missing")
    bars: list[Bar]


class MarketRow(Frozen):
    """One board's breadth in a `market_update` frame (a BreadthRow plus its time and event id)."""

    board: BreadthBoard
    advancers: int
    decliners: int
    unchanged: int
    limit_up: int
    limit_down: int
    mean_change_percent: float
    median_change_percent: float
    amount: float
    count: int
    timestamp: datetime
    event_id: str | None = None


def breadth_rows(event_id: str | None, doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The `market_update` rows (MarketRow dicts) from a Breadth-shaped document (the stored
    event's JSON): the one builder of breadth rows, used on parsed JSON without models."""
    stamp = doc["time"]
    return [{**row, "timestamp": stamp, "event_id": event_id} for row in doc["rows"]]


class MarketUpdate(ServerMessage):
    """Market breadth per board, pushed to `market` subscribers (one frame per computation)."""

    type: Literal["market_update"] = "market_update"
    target: str = "market"
    epoch: str | None = None
    event_id: str | None = None
    snapshot: bool = False
    data: list[MarketRow]


class MarketBreadth(Frozen):
    """`GET /api/market/breadth`: the latest breadth."""

    event_id: str
    data: list[MarketRow]


class SignalItem(Frozen):
    """One row of `GET /api/signals/buy`: a signal in the seed's list style (`code` beside `ts_code`)."""

    code: str
    ts_code: str
    name: str
    side: Literal["buy", "sell"]
    signal_date: date
    signal_price: float | None = None
    confidence: float | None = None
    reason: str = ""


class SignalList(Frozen):
    """`GET /api/signals/buy?strategy=`: the strategy's current buy signals, newest signal date first."""

    strategy: str
    data: list[SignalItem]
    count: int


def signal_row(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A `SignalItem` as a dict from a Signal-shaped mapping (a model dump or a database row):
    the one builder of signal rows; the list call uses it on rows without building models."""
    code = doc["ts_code"]
    return {
        "code": code.split(".", 1)[0],
        "ts_code": code,
        "name": doc["name"],
        "side": doc["side"],
        "signal_date": doc["signal_date"],
        "signal_price": doc["signal_price"],
        "confidence": doc["confidence"],
        "reason": doc["reason"],
    }


class Pong(ServerMessage):
    type: Literal["pong"] = "pong"
    timestamp: datetime = Field(default_factory=_now)
    id: RequestId = None


class ErrorCode:
    """Machine-readable `code` values of `error` frames."""

    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    FORBIDDEN = 403
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    RATE_LIMITED = "rate_limited"
    NOT_FOUND = 404
    UNAVAILABLE = "unavailable"
    UNKNOWN_STRATEGY = "unknown_strategy"  # never had an event: nothing to follow (yet)
    NODE_FULL = "node_full"  # this edge node follows as many streams as it may; try another


class Error(ServerMessage):
    type: Literal["error"] = "error"
    error: str
    details: Any = None
    code: str | int
    id: RequestId = None


SERVER_MESSAGES: tuple[type[ServerMessage], ...] = (
    Connected, Subscribed, Unsubscribed, PriceUpdate, SignalUpdate, KlineUpdate, MarketUpdate, Pong, Error,
)
CLIENT_MESSAGES: tuple[type[ClientMessage], ...] = (Subscribe, Unsubscribe, Ping)
# HTTP API bodies with a schema of their own (the rest reuse the models above)
HTTP_RESPONSES: tuple[type[Frozen], ...] = (SignalList, KlineList, MarketBreadth)


class ProtocolError(ValueError):
    """A client frame the server answers with an `error` frame; the connection stays open."""

    def __init__(self, code: str | int, error: str, details: Any = None, request_id: RequestId = None):
        super().__init__(error)
        self.code = code
        self.error = error
        self.details = details
        self.request_id = request_id

    def to_message(self) -> Error:
        return Error(error=self.error, details=self.details, code=self.code, id=self.request_id)


_KNOWN_TYPES = {"subscribe", "unsubscribe", "ping"}


def parse_client_message(raw: str | bytes) -> Subscribe | Unsubscribe | Ping:
    """Decode one text frame, or raise ProtocolError naming what is wrong."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, "frame is not valid JSON", str(exc)) from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "frame must be a JSON object")
    request_id = obj.get("id") if isinstance(obj.get("id"), (str, int)) else None
    kind = obj.get("type")
    if kind is not None and not isinstance(kind, str):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            "type must be a string",
            [{"field": "type", "problem": f"must be one of {', '.join(sorted(_KNOWN_TYPES))}"}],
            request_id,
        )
    if kind not in _KNOWN_TYPES:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown message type {kind!r}",
            {"known": sorted(_KNOWN_TYPES)},
            request_id,
        )
    try:
        return _client_adapter.validate_python(obj)
    except ValidationError as exc:
        # loc is (type, field[, union member]): one entry per field, its problems joined
        problems: dict[str, list[str]] = {}
        for e in exc.errors(include_url=False):
            name = str(e["loc"][1]) if len(e["loc"]) > 1 else str(e["loc"][0])
            problems.setdefault(name, []).append(e["msg"].removeprefix("Value error, "))
        details = [{"field": name, "problem": "; ".join(msgs)} for name, msgs in problems.items()]
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"bad {kind} message", details, request_id) from None
