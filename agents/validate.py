"""Tick validation as pure functions: a reason string for bad input, None for a good tick."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from schemas.events import Tick
from schemas.market import InvalidCode, limit_band, parse_ts_code
from schemas.universe import Listing


class Reject:
    """Reasons a tick is dead-lettered (also the `reason` label of the rejected counter)."""

    MISSING_PRICE = "missing_price"
    ZERO_PRICE = "zero_price"
    UNKNOWN_CODE = "unknown_code"
    OUTSIDE_BAND = "outside_limit_band"
    VOLUME_BACKWARDS = "volume_backwards"
    INVALID = "invalid"


class TickRejected(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def parse_tick(raw: Tick | Mapping[str, Any]) -> Tick:
    """A Tick from a source's dict, or TickRejected with the reason."""
    if isinstance(raw, Tick):
        return raw
    price = raw.get("price")
    if price is None or price == "":
        raise TickRejected(Reject.MISSING_PRICE)
    try:
        parse_ts_code(raw.get("ts_code"))  # type: ignore[arg-type]
    except (InvalidCode, TypeError) as exc:
        raise TickRejected(Reject.UNKNOWN_CODE, str(exc)) from None
    try:
        return Tick.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise TickRejected(Reject.INVALID, f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def check_tick(tick: Tick, last_volume: int | None, listing: Listing | None = None) -> str | None:
    """The reason this tick is bad input, or None. `last_volume`: the code's previous volume today;
    `listing`: the code's row in the universe, whose listing date frees a new listing's first days."""
    if tick.price <= 0:
        return Reject.ZERO_PRICE
    if tick.pre_close > 0:
        # the tick's own name says whether the stock is ST today; a universe file may be older
        band = limit_band(tick.ts_code, tick.name, tick.pre_close, tick.time.date(),
                          list_date=listing.list_date if listing else None,
                          st=listing.st if listing and not tick.name else None)
        if not band.contains(tick.price):
            return Reject.OUTSIDE_BAND
    if last_volume is not None and tick.volume < last_volume:
        return Reject.VOLUME_BACKWARDS
    return None
