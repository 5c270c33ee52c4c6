"""Small builders for realistic events, shared by the tests."""

from __future__ import annotations

from datetime import date, datetime, timedelta

from schemas.events import PriceChange, Signal, SignalChange, Tick
from schemas.market import SHANGHAI

T0 = datetime(2026, 11, 24, 10, 0, 0, tzinfo=SHANGHAI)
STOCKS = [("600519.SH", "贵州茅台", 1500.0), ("000001.SZ", "平安银行", 11.2), ("300750.SZ", "宁德时代", 200.0)]


def signal(strategy: str = "volume_wave", ts_code: str = "600519.SH", price: float = 1480.0) -> Signal:
    return Signal(strategy=strategy, ts_code=ts_code, name="", signal_date=date(2026, 11, 20), signal_price=price)


def price_change(
    strategy: str = "volume_wave",
    ts_code: str = "600519.SH",
    price: float = 1510.0,
    *,
    partition: int = 0,
    offset: int = 0,
    pre_close: float = 1500.0,
) -> PriceChange:
    tick = Tick(ts_code=ts_code, name="", time=T0 + timedelta(seconds=offset), price=price,
                pre_close=pre_close, volume=1000 + offset, source="test")
    return PriceChange.from_tick(tick, signal(strategy, ts_code, pre_close), ingest_time=tick.time,
                                 partition=partition, offset=offset)


def price_changes(n: int, strategy: str = "volume_wave", *, partition: int = 0, start: int = 0) -> list[PriceChange]:
    """n events cycling over three stocks, at consecutive offsets of one partition."""
    out = []
    for i in range(start, start + n):
        code, _, pre = STOCKS[i % len(STOCKS)]
        out.append(price_change(strategy, code, round(pre * (1 + (i % 7) / 100), 2),
                                partition=partition, offset=i, pre_close=pre))
    return out


def signal_change(action: str = "add", strategy: str = "volume_wave", ts_code: str = "600519.SH") -> SignalChange:
    return SignalChange(action=action, signal=signal(strategy, ts_code))  # type: ignore[arg-type]


def raw_tick(code="600519.SH", price=1510.0, seconds=0, volume=1000, pre_close=1500.0, name="贵州茅台") -> dict:
    """A tick as a source hands it over: a plain dict, times as ISO text."""
    return {"ts_code": code, "name": name, "time": (T0 + timedelta(seconds=seconds)).isoformat(),
            "price": price, "pre_close": pre_close, "volume": volume}
