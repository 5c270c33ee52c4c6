"""Realistic PriceChange events written through append_events, until the join agent exists.

K real stocks walk randomly inside their daily limit bands; every event carries
the signal price and an advancing tick position, so exactly-once dedup keeps them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from datetime import datetime

from schemas.events import PriceChange, Signal, Tick
from schemas.market import SHANGHAI, limit_band
from schemas.universe import Listing
from streams.events import EventLog

# each generator run writes its own tick partition range: offsets then only grow
_GENERATOR_PARTITION = 1_000_000


class PriceWalk:
    """Per-stock random walk clamped to the limit band, volume only growing (pure, seedable)."""

    def __init__(self, listings: Sequence[Listing], strategy: str, seed: int | None = None):
        self.rng = random.Random(seed)
        self.strategy = strategy
        today = datetime.now(SHANGHAI).date()
        missing = [listing.ts_code for listing in listings if listing.pre_close is None]
        if missing:
            raise ValueError(f"no previous close to walk from: {', '.join(missing[:5])}")
        self.pre_close = {listing.ts_code: float(listing.pre_close or 0) for listing in listings}
        self.stocks = [
            (listing, limit_band(listing.ts_code, listing.name, self.pre_close[listing.ts_code], today,
                                 list_date=listing.list_date, st=listing.st))
            for listing in listings
        ]
        self.prices = dict(self.pre_close)
        self.volume = {listing.ts_code: 0 for listing in listings}
        self.signals = {
            listing.ts_code: Signal(
                strategy=strategy, ts_code=listing.ts_code, name=listing.name, signal_date=today,
                signal_price=round(self.pre_close[listing.ts_code] * self.rng.uniform(0.95, 1.02), 2),
                confidence=round(self.rng.uniform(0.5, 0.95), 2), reason="demo",
            )
            for listing in listings
        }
        self.offset = int(time.time() * 1000)  # a fresh run never falls behind an earlier one

    def next_event(self) -> PriceChange:
        listing, band = self.stocks[self.rng.randrange(len(self.stocks))]
        code = listing.ts_code
        step = self.prices[code] * self.rng.gauss(0, 0.002)
        price = round(min(band.high, max(band.low, self.prices[code] + step)), 2)
        self.prices[code] = price
        self.volume[code] += self.rng.randrange(100, 50_000, 100)
        self.offset += 1
        now = datetime.now(SHANGHAI)
        tick = Tick(ts_code=code, name=listing.name, time=now, price=price, pre_close=self.pre_close[code],
                    volume=self.volume[code], source="generator")
        return PriceChange.from_tick(tick, self.signals[code], ingest_time=now,
                                     partition=_GENERATOR_PARTITION, offset=self.offset)


async def generate(
    log: EventLog,
    strategy: str,
    *,
    listings: Sequence[Listing],
    rate: float,
    count: int | None,
    stop: asyncio.Event,
    batch: int = 100,
    seed: int | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Write events at `rate`/s (0: as fast as possible) until `count` or `stop`; returns how many."""
    walk = PriceWalk(listings, strategy, seed)
    written = 0
    started = time.monotonic()
    while not stop.is_set() and (count is None or written < count):
        size = batch if count is None else min(batch, count - written)
        if rate > 0:
            # small batches at low rates keep events flowing smoothly
            size = max(1, min(size, int(rate / 10) or 1))
        ids = await log.append_events(strategy, [walk.next_event() for _ in range(size)])
        written += len(ids)
        if on_progress:
            on_progress(len(ids))
        if rate > 0:
            ahead = written / rate - (time.monotonic() - started)
            if ahead > 0:
                try:
                    await asyncio.wait_for(stop.wait(), timeout=ahead)
                except asyncio.TimeoutError:
                    pass
    return written
