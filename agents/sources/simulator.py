"""A simulated A-share session: random walks inside each stock's limit band.

Level-1 style: one snapshot per stock every `interval` seconds (3 s like the
exchanges' feeds), in the morning (9:30-11:30) and afternoon (13:00-15:00)
sessions of Beijing time, unless told to ignore the clock for a demo. A new listing
in its first days has no limit band: on its first day it opens well above its issue
price, as A-share listings do, and walks freely.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from datetime import date, datetime, time, timedelta

from agents.sources import RawTick
from schemas.calendar import is_trading_day
from schemas.events import Tick
from schemas.market import SHANGHAI, LimitBand, limit_band
from schemas.universe import Listing, default_universe

log = logging.getLogger("tickwave.ingest")

SESSIONS = ((time(9, 30), time(11, 30)), (time(13, 0), time(15, 0)))


def in_session(moment: datetime) -> bool:
    """True during the continuous-trading sessions of a trading day (Beijing time)."""
    local = moment.astimezone(SHANGHAI)
    if not is_trading_day(local.date()):
        return False
    return any(start <= local.time() < end for start, end in SESSIONS)


def next_open(moment: datetime) -> datetime:
    """When the next continuous-trading session starts, at or after `moment` (Beijing time)."""
    local = moment.astimezone(SHANGHAI)
    day = local.date()
    for _ in range(60):  # the longest closure (Spring Festival) is well under this
        if is_trading_day(day):
            for start, _end in SESSIONS:
                opens = datetime.combine(day, start, tzinfo=SHANGHAI)
                if opens >= local:
                    return opens
        day += timedelta(days=1)
        local = datetime.combine(day, time(0), tzinfo=SHANGHAI)
    raise ValueError(f"no trading session within 60 days of {moment.isoformat()}")


class _Stock:
    __slots__ = ("listing", "pre_close", "band", "price", "high", "low", "open", "volume", "amount")

    def __init__(self, listing: Listing, pre_close: float, band: LimitBand, open_price: float):
        self.listing, self.pre_close, self.band = listing, pre_close, band
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
        clock: Callable[[], datetime] | None = None,
        today: date | None = None,
    ):
        """`today`: the trading day whose limit bands apply (default: today in Beijing)."""
        self.rng = random.Random(seed)
        self.interval = interval
        self.ignore_clock = ignore_clock
        self.volatility = volatility
        self.clock = clock or (lambda: datetime.now(SHANGHAI))
        today = today or datetime.now(SHANGHAI).date()
        self.stocks = []
        for listing in listings or default_universe().pick(20):
            if listing.pre_close is None:
                raise ValueError(f"{listing.ts_code} has no previous close to simulate from")
            pre = listing.pre_close
            band = limit_band(listing.ts_code, listing.name, pre, today, list_date=listing.list_date, st=listing.st)
            first_day = listing.list_date == today
            # a listing day opens well above the issue price; any other day near the previous close
            ratio = self.rng.uniform(1.3, 2.5) if first_day and not band.bounded else self.rng.uniform(0.99, 1.01)
            open_price = round(min(band.high, max(band.low, pre * ratio)), 2)
            self.stocks.append(_Stock(listing, pre, band, open_price))

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
                pre_close=s.pre_close, open=s.open, high=s.high, low=s.low,
                volume=s.volume, amount=s.amount, bid1=round(max(s.band.low, s.price - tick_size), 2),
                ask1=round(min(s.band.high, s.price + tick_size), 2), source="sim",
            ))
        return out

    async def batches(self) -> AsyncIterator[list[RawTick]]:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        closed = False
        while True:
            now = self.clock()
            if self.ignore_clock or in_session(now):
                if closed:
                    log.info("market open: simulating", extra={"stocks": len(self.stocks)})
                    closed = False
                yield list(self.step(now))
            elif not closed:
                # one line when the market closes (or is closed at start), never a silent stall
                closed = True
                log.info("market closed: no ticks until it opens (--ignore-clock simulates at any hour)",
                         extra={"now": now.isoformat(timespec="seconds"),
                                "next_open": next_open(now).isoformat(timespec="minutes")})
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
