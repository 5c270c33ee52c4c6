"""K-line (candlestick) bars: the Bar model and the A-share session clock, as pure functions.

A bar covers one minute of the session clock, labelled by its start: 09:30-11:30 and
13:00-15:00 Beijing time. The opening auction's ticks (09:15-09:30) fall into the 09:30
bar; the morning's closing print (stamped 11:30:xx) into the 11:29 bar and the closing
auction's (15:00:xx) into the 14:59 bar, so those two bars close a minute after their
nominal end. Any other tick outside the sessions (the lunch break, after the close, a
non-trading day) belongs to no bar: the lunch break and the close never produce bars.
`Sessions.ALWAYS` makes every minute of every day a bar minute (demos on a simulator that
ignores the exchange's clock).
"""

from __future__ import annotations

from datetime import datetime, time, timedelta
from typing import Literal

from pydantic import Field

from schemas.base import Frozen, ShanghaiTime
from schemas.calendar import is_trading_day
from schemas.market import SHANGHAI

Interval = Literal["1m", "5m", "15m", "1d"]
INTERVALS: tuple[str, ...] = ("1m", "5m", "15m", "1d")
MINUTE = timedelta(minutes=1)
SessionMode = Literal["exchange", "always"]

_OPEN_AUCTION, _AM_OPEN, _AM_CLOSE = 9 * 60 + 15, 9 * 60 + 30, 11 * 60 + 30
_PM_OPEN, _PM_CLOSE = 13 * 60, 15 * 60


class Bar(Frozen):
    """One OHLCV bar of one stock: prices in yuan, volume in shares and amount in yuan traded in the bar."""

    ts_code: str
    interval: Interval = "1m"
    start: ShanghaiTime = Field(description="bar open time")
    end: ShanghaiTime = Field(description="bar close time (exclusive)")
    open: float
    high: float
    low: float
    close: float
    volume: int = Field(ge=0)
    amount: float = Field(ge=0)
    count: int = Field(ge=1, description="ticks in the bar")
    closed: bool = True
    event_id: str | None = Field(None, description="Redis stream id of the 1-minute bar (the newest one in a derived bar)")


def bar_start(moment: datetime, mode: SessionMode = "exchange") -> datetime | None:
    """The start of the 1-minute bar a tick stamped `moment` belongs to, or None (outside the sessions)."""
    local = moment.astimezone(SHANGHAI)
    floor = local.replace(second=0, microsecond=0)
    if mode == "always":
        return floor
    if not is_trading_day(local.date()):
        return None
    hm = local.hour * 60 + local.minute
    if _OPEN_AUCTION <= hm < _AM_OPEN:
        return floor.replace(hour=9, minute=30)
    if _AM_OPEN <= hm < _AM_CLOSE or _PM_OPEN <= hm < _PM_CLOSE:
        return floor
    if hm in (_AM_CLOSE, _PM_CLOSE):  # the closing prints fold into the session's last bar
        return floor - MINUTE
    return None


def bar_deadline(start: datetime, mode: SessionMode = "exchange") -> datetime:
    """When no more ticks can belong to the bar starting at `start` (before any grace)."""
    local = start.astimezone(SHANGHAI)
    if mode == "exchange" and local.hour * 60 + local.minute + 1 in (_AM_CLOSE, _PM_CLOSE):
        return local + 2 * MINUTE  # the 11:30:xx / 15:00:xx prints still come in
    return local + MINUTE


def bucket(start: datetime, interval: str) -> tuple[datetime, datetime]:
    """(start, end) of the `interval` bar holding the 1-minute bar starting at `start`."""
    local = start.astimezone(SHANGHAI)
    if interval == "1m":
        return local, local + MINUTE
    if interval == "1d":
        day = datetime.combine(local.date(), time(0), tzinfo=SHANGHAI)
        return day, day + timedelta(days=1)
    size = {"5m": 5, "15m": 15}[interval]
    floor = local.replace(minute=local.minute - local.minute % size)
    return floor, floor + timedelta(minutes=size)


def completes(bar: Bar, interval: str) -> bool:
    """Whether a closed 1-minute bar is the last one of its `interval` bar."""
    if interval == "1m":
        return bar.closed
    end = bar.end.astimezone(SHANGHAI)
    if interval == "1d":
        return end.time() in (time(15, 0), time(0, 0))
    return bar.closed and end == bucket(bar.start, interval)[1]


def derive(bars: list[Bar], interval: str) -> list[Bar]:
    """`interval` bars from consecutive 1-minute bars of one stock (oldest first); the last one
    is open (closed False) unless its last minute is in. Each carries its newest minute's id."""
    if interval == "1m":
        return list(bars)
    out: list[Bar] = []
    for one in bars:
        start, end = bucket(one.start, interval)
        prev = out[-1] if out and out[-1].start == start else None
        if prev is None:
            merged = one.model_copy(update={"interval": interval, "start": start, "end": end})
        else:
            merged = prev.model_copy(update={
                "high": max(prev.high, one.high), "low": min(prev.low, one.low), "close": one.close,
                "volume": prev.volume + one.volume, "amount": round(prev.amount + one.amount, 2),
                "count": prev.count + one.count, "event_id": one.event_id,
            })
            out.pop()
        out.append(merged.model_copy(update={"closed": completes(one, interval)}))
    return out
