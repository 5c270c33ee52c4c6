"""Helpers for the K-line tests: a trading day of ticks, the bars they owe computed by brute
force (without agents/klines.py or schemas/klines.py), and the bars the streams hold."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta

from schemas.events import Tick
from schemas.market import SHANGHAI
from streams.connection import AnyRedis
from streams.keys import Keys
from streams.klines import decode_bar

DAY = datetime(2026, 11, 24, tzinfo=SHANGHAI)  # a Tuesday, a trading day
# minutes of the day with ticks: the opening auction, the morning's first minutes, its last ones
# with the 11:30 print and the lunch break, the afternoon's start, its end with the closing
# auction's 15:00 print, and after the close
MINUTES = ([(9, 25)] + [(9, m) for m in range(30, 45)] + [(11, m) for m in range(25, 31)] + [(12, 0), (12, 40)]
           + [(13, m) for m in range(0, 10)] + [(14, m) for m in range(52, 60)] + [(15, 0), (15, 10)])
SECONDS = (4, 21, 38, 55)

BarKey = tuple[str, str, str, float, float, float, float, int, float, int, bool]


def day_ticks(codes: list[str], minutes=MINUTES, seconds=SECONDS) -> list[list[Tick]]:
    """Ticks in time order, one list per (minute, second) step; prices and cumulative figures
    move differently per stock, and some stocks skip some steps (quiet stocks)."""
    steps = []
    volume = {c: 0 for c in codes}
    amount = {c: 0.0 for c in codes}
    n = 0
    for hour, minute in minutes:
        for second in seconds:
            batch = []
            for i, code in enumerate(codes):
                n += 1
                if (n * 31 + i) % 7 == 0:
                    continue  # this stock is quiet this step
                price = round(10 * (1 + ((n * 7919 + i * 104729) % 161 - 80) / 1000), 2)
                volume[code] += 100 * ((n + i) % 13 + 1)
                amount[code] = round(amount[code] + price * 100 * ((n + i) % 13 + 1), 2)
                batch.append(Tick(ts_code=code, name="", time=DAY.replace(hour=hour, minute=minute, second=second)
                                  + timedelta(milliseconds=i), price=price, pre_close=10.0, volume=volume[code],
                                  amount=amount[code], source="test"))
            steps.append(batch)
    return steps


def _minute(t: datetime) -> datetime | None:
    """The bar a tick belongs to, written out from the rules (docs/operations.md), not imported."""
    local = t.astimezone(SHANGHAI)
    hm = (local.hour, local.minute)
    floor = local.replace(second=0, microsecond=0)
    if (9, 15) <= hm < (9, 30):
        return floor.replace(minute=30)
    if (9, 30) <= hm < (11, 30) or (13, 0) <= hm < (15, 0):
        return floor
    if hm == (11, 30):
        return floor.replace(minute=29)
    if hm == (15, 0):
        return floor.replace(hour=14, minute=59)
    return None


def brute_force_bars(ticks: list[Tick]) -> list[BarKey]:
    """Every bar the ticks owe: group each stock's in-session ticks by bar; a bar's volume and
    amount are the cumulative figures at its end less those before it."""
    by_code: dict[str, list[Tick]] = defaultdict(list)
    for t in ticks:
        by_code[t.ts_code].append(t)
    out = []
    for code, series in by_code.items():
        inside = [(t, _minute(t.time)) for t in series if _minute(t.time) is not None]
        starts = sorted({m for _, m in inside})
        for start in starts:
            group = [t for t, m in inside if m == start]
            before = [t for t, m in inside if m < start]
            upto = before + group
            vol = max(t.volume for t in upto) - max((t.volume for t in before), default=0)
            amt = round(max(t.amount for t in upto) - max((t.amount for t in before), default=0.0), 2)
            out.append((code, start.isoformat(), (start + timedelta(minutes=1)).isoformat(), group[0].price,
                        max(t.price for t in group), min(t.price for t in group), group[-1].price, vol, amt,
                        len(group), True))
    return out


async def stream_bars(client: AnyRedis, keys: Keys, codes: list[str], partitions: int = 4) -> tuple[list[BarKey], dict]:
    """Every bar in the stocks' streams (duplicates kept), and the entries by stock as (id, key)."""
    from streams.partition import partition_for

    out: list[BarKey] = []
    by_code: dict[str, list[tuple[str, BarKey]]] = {}
    for code in codes:
        for eid, fields in await client.xrange(keys.kline(partition_for(code, partitions), code)):
            b = decode_bar(eid, fields)
            key = (b.ts_code, b.start.isoformat(), b.end.isoformat(), b.open, b.high, b.low, b.close, b.volume,
                   b.amount, b.count, b.closed)
            out.append(key)
            by_code.setdefault(code, []).append((eid.decode(), key))
    return out, by_code
