"""A simulated A-share session: random walks inside each stock's limit band.

Level-1 style: one snapshot per stock every `interval` seconds (3 s like the
exchanges' feeds), in the morning (9:30-11:30) and afternoon (13:00-15:00)
sessions of Beijing time, unless told to ignore the clock for a demo.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import datetime, time

from agents.sources import RawTick
from agents.universe import Listing, pick
from schemas.events import Tick
from schemas.market import SHANGHAI, LimitBand, limit_band

SESSIONS = ((time(9, 30), time(11, 30)), (time(13, 0), time(15, 0)))


def in_session(moment: datetime) -> bool:
    """True during the continuous-trading sessions of a weekday (Beijing time)."""
    local = moment.astimezone(SHANGHAI)
    if local.weekday() >= 5:
        return False
    return any(start <= local.time() < end for start, end in SESSIONS)


class _Stock:
    __slots__ = ("listing", "band", "price", "high", "low", "open", "volume", "amount")

    def __init__(self, listing: Listing, band: LimitBand, open_price: float):
        self.listing, self.band = listing, band
        self.price = self.high = self.low = self.open = open_price
        self.volume = 0
        self.amount = 0.0


class Simulator:
    """Seedable, pure apart from the clock; `step()` gives one snapshot of every stock."""

    name = "sim"

    def __init__(
        self,
        listings: list[Listing] | None = None,
        *,
        interval: float = 3.0,
        ignore_clock: bool = False,
        seed: int | None = None,
        volatility: float = 0.003,
    ):
        self.rng = random.Random(seed)
        self.interval = interval
        self.ignore_clock = ignore_clock
        self.volatility = volatility
        today = datetime.now(SHANGHAI).date()
        self.stocks = []
        for listing in listings or pick(20):
            band = limit_band(listing.ts_code, listing.name, listing.pre_close, today)
            open_price = round(min(band.high, max(band.low, listing.pre_close * self.rng.uniform(0.99, 1.01))), 2)
            self.stocks.append(_Stock(listing, band, open_price))

    def step(self, now: datetime | None = None) -> list[Tick]:
        """Advance every stock one snapshot."""
        now = now or datetime.now(SHANGHAI)
        out = []
        for s in self.stocks:
            drift = s.price * self.rng.gauss(0, self.volatility)
            # reflect off the limits rather than sticking to them
            price = s.price + drift
            if price > s.band.high:
                price = s.band.high - (price - s.band.high)
            if price < s.band.low:
                price = s.band.low + (s.band.low - price)
            s.price = round(min(s.band.high, max(s.band.low, price)), 2)
            s.high, s.low = max(s.high, s.price), min(s.low, s.price)
            traded = self.rng.randrange(1, 200) * 100  # A-shares trade in lots of 100
            s.volume += traded
            s.amount = round(s.amount + traded * s.price, 2)
            tick_size = 0.01
            out.append(Tick(
                ts_code=s.listing.ts_code, name=s.listing.name, time=now, price=s.price,
                pre_close=s.listing.pre_close, open=s.open, high=s.high, low=s.low,
                volume=s.volume, amount=s.amount, bid1=round(max(s.band.low, s.price - tick_size), 2),
                ask1=round(min(s.band.high, s.price + tick_size), 2), source="sim",
            ))
        return out

    async def batches(self) -> AsyncIterator[list[RawTick]]:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            now = datetime.now(SHANGHAI)
            if self.ignore_clock or in_session(now):
                yield list(self.step(now))
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
