"""pydantic models for every event and WebSocket message, and pure A-share market rules."""

from schemas.events import PriceChange, Signal, SignalChange, Tick
from schemas.market import InvalidCode, LimitBand, limit_band, parse_ts_code, percent_change

__all__ = [
    "InvalidCode", "LimitBand", "PriceChange", "Signal", "SignalChange", "Tick",
    "limit_band", "parse_ts_code", "percent_change",
]
