"""Domain events: ticks in, signals beside, price changes out."""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import Field, field_validator

from schemas.base import Frozen, ShanghaiTime
from schemas.market import bare_code, change_since_signal, parse_ts_code, percent_change


class _HasCode(Frozen):
    ts_code: str = Field(description="Exchange code, e.g. 600519.SH")

    @field_validator("ts_code", mode="before")
    @classmethod
    def _normalise_code(cls, value: object) -> str:
        return parse_ts_code(value)  # type: ignore[arg-type]


class Tick(_HasCode):
    """One Level-1 quote snapshot. Prices in yuan, volume in shares, amount in yuan."""

    name: str = ""
    time: ShanghaiTime
    price: float
    pre_close: float
    open: float = 0.0
    high: float = 0.0
    low: float = 0.0
    volume: int = Field(0, ge=0, description="cumulative shares traded today")
    amount: float = Field(0.0, ge=0, description="cumulative yuan traded today")
    bid1: float = 0.0
    ask1: float = 0.0
    source: str = "unknown"


class Signal(_HasCode):
    """A strategy's buy (or sell) signal on one stock, as kept in PostgreSQL."""

    strategy: str
    name: str = ""
    side: Literal["buy", "sell"] = "buy"
    signal_date: date
    signal_price: float | None = None
    confidence: float | None = Field(None, ge=0, le=1)
    reason: str = ""


class SignalChange(Frozen):
    """A signal added to or removed from a strategy's list."""

    action: Literal["add", "remove"]
    signal: Signal


class PriceChange(_HasCode):
    """One strategy's view of one tick of a signalled stock; the public event."""

    event_id: str | None = Field(None, description="Redis stream id ms-seq, set when appended")
    strategy: str
    name: str = ""
    price: float
    pre_close: float
    change: float
    change_percent: float
    signal_price: float | None = None
    change_since_signal_percent: float | None = None
    volume: int = 0
    tick_time: ShanghaiTime
    ingest_time: ShanghaiTime
    source_partition: int = Field(ge=0)
    source_offset: int = Field(ge=0)

    @property
    def code(self) -> str:
        return bare_code(self.ts_code)

    @classmethod
    def from_tick(
        cls,
        tick: Tick,
        signal: Signal,
        *,
        ingest_time: ShanghaiTime,
        partition: int,
        offset: int,
    ) -> PriceChange:
        """Join one tick with one signal (pure)."""
        return cls(
            event_id=None,
            strategy=signal.strategy,
            ts_code=tick.ts_code,
            name=tick.name or signal.name,
            price=tick.price,
            pre_close=tick.pre_close,
            change=round(tick.price - tick.pre_close, 4),
            change_percent=percent_change(tick.price, tick.pre_close),
            signal_price=signal.signal_price,
            change_since_signal_percent=change_since_signal(tick.price, signal.signal_price),
            volume=tick.volume,
            tick_time=tick.time,
            ingest_time=ingest_time,
            source_partition=partition,
            source_offset=offset,
        )


BreadthBoard = Literal["all", "sh_main", "sz_main", "chinext", "star", "beijing"]
BREADTH_BOARDS: tuple[BreadthBoard, ...] = ("all", "sh_main", "sz_main", "chinext", "star", "beijing")


class BreadthRow(Frozen):
    """Market breadth of one board (or `all`) over the stocks with a tick on the trade date."""

    board: BreadthBoard
    advancers: int = Field(ge=0, description="stocks above their previous close")
    decliners: int = Field(ge=0, description="stocks below their previous close")
    unchanged: int = Field(ge=0, description="stocks at their previous close")
    limit_up: int = Field(ge=0, description="stocks at (or above) their limit-up price")
    limit_down: int = Field(ge=0, description="stocks at (or below) their limit-down price")
    mean_change_percent: float = Field(description="mean percent change, exact, rounded to 4 places")
    median_change_percent: float = Field(description="median percent change, exact, rounded to 4 places")
    amount: float = Field(ge=0, description="yuan traded today: the cumulative amounts' sum, rounded to the fen")
    count: int = Field(ge=0, description="stocks with a tick on the trade date")


class Breadth(Frozen):
    """One breadth computation for the whole market: the event of the `market` stream."""

    trade_date: date
    time: ShanghaiTime = Field(description="the newest tick time the figures include")
    computed_at: ShanghaiTime
    rows: list[BreadthRow]
