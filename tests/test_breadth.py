"""Market breadth end to end: real `tickwave worker` processes on the Redis Streams driver,
the `market` stream's latest entry checked against a brute-force count from the same ticks."""

from __future__ import annotations

import asyncio
import math
import random
from datetime import date, timedelta
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from agents.breadth import combine, partials, stock_state
from schemas.events import Breadth, Tick
from schemas.universe import default_universe
from streams.codec import decode_event, encode_record
from streams.keys import Keys
from streams.log import PartitionLog
from tests.driver_harness import wait_until
from tests.join_harness import T0, JoinWorker, Written, send_ticks, topics

FAST = {"TICKWAVE_BREADTH_INTERVAL_S": "0.5"}
BOARD_OF_PREFIX = {"60": "sh_main", "00": "sz_main", "30": "chinext", "68": "star"}
RATIO = {"sh_main": "0.10", "sz_main": "0.10", "chinext": "0.20", "star": "0.20", "beijing": "0.30"}


def seasoned_codes(per_board: int) -> dict[str, list[str]]:
    """Codes of the built-in universe listed long ago (no free first days), per board."""
    out: dict[str, list[str]] = {b: [] for b in RATIO}
    for listing in default_universe():
        if listing.list_date is None or listing.list_date > date(2026, 1, 1):
            continue
        board = "beijing" if listing.ts_code.endswith(".BJ") else BOARD_OF_PREFIX.get(listing.ts_code[:2])
        if board and len(out[board]) < per_board:
            out[board].append(listing.ts_code)
    return out


def board_name(code: str) -> str:
    return "beijing" if code.endswith(".BJ") else BOARD_OF_PREFIX[code[:2]]


def limits(code: str, pre_close: float) -> tuple[float, float]:
    ratio, base = Decimal(RATIO[board_name(code)]), Decimal(str(pre_close))
    fen = Decimal("0.01")
    return (float((base * (1 - ratio)).quantize(fen, ROUND_HALF_UP)),
            float((base * (1 + ratio)).quantize(fen, ROUND_HALF_UP)))


class Market:
    """Ticks for a set of stocks: at limit-up, limit-down, unchanged, or anywhere in the band."""

    def __init__(self, codes: list[str], seed: int):
        self.rng = random.Random(seed)
        self.codes = codes
        self.pre = {c: round(self.rng.uniform(3, 80), 2) for c in codes}
        self.amount = {c: 0.0 for c in codes}
        self.n = 0

    def tick(self, code: str, day: date | None = None) -> Tick:
        pre = self.pre[code]
        low, high = limits(code, pre)
        kind = self.rng.random()
        price = high if kind < 0.1 else low if kind < 0.2 else pre if kind < 0.3 else \
            round(self.rng.uniform(low + 0.01, high - 0.01), 2)
        self.amount[code] = round(self.amount[code] + self.rng.uniform(1e4, 5e6), 2)
        self.n += 1
        when = T0 + timedelta(milliseconds=self.n)
        if day is not None:
            when = when.replace(year=day.year, month=day.month, day=day.day)
        return Tick(ts_code=code, name=f"name {code}", time=when, price=price, pre_close=pre,
                    amount=self.amount[code], volume=100 * self.n, source="test")

    def ticks(self, count: int, codes: list[str] | None = None) -> list[Tick]:
        pool = codes or self.codes
        return [self.tick(self.rng.choice(pool)) for _ in range(count)]


def brute_force(written: list[Written]) -> dict[str, dict[str, Any]]:
    """Breadth per board from the ticks alone: each stock's last tick (by partition offset) on
    the newest trade date, counted, its percent change averaged and its median taken in Decimal."""
    last: dict[str, Written] = {}
    for w in written:
        if w.tick.ts_code not in last or w.offset > last[w.tick.ts_code].offset:
            last[w.tick.ts_code] = w
    day = max(w.tick.time.date() for w in last.values())
    ticks = [w.tick for w in last.values() if w.tick.time.date() == day]
    out = {}
    q = Decimal("0.0001")
    for board in ("all", *RATIO):
        mine = [t for t in ticks if board == "all" or board_name(t.ts_code) == board]
        pct = sorted(Decimal(str(round((t.price - t.pre_close) / t.pre_close * 100, 4))) for t in mine)
        n = len(pct)
        median = (pct[n // 2] if n % 2 else (pct[n // 2 - 1] + pct[n // 2]) / 2) if n else Decimal(0)
        out[board] = {
            "board": board, "count": n,
            "advancers": sum(t.price > t.pre_close for t in mine),
            "decliners": sum(t.price < t.pre_close for t in mine),
            "unchanged": sum(t.price == t.pre_close for t in mine),
            "limit_up": sum(t.price >= limits(t.ts_code, t.pre_close)[1] for t in mine),
            "limit_down": sum(t.price <= limits(t.ts_code, t.pre_close)[0] for t in mine),
            "mean_change_percent": float((sum(pct) / n).quantize(q, ROUND_HALF_EVEN)) if n else 0.0,
            "median_change_percent": float(median.quantize(q, ROUND_HALF_EVEN)),
            "amount": round(math.fsum(t.amount for t in mine), 2),
        }
    return out


async def latest_breadth(redis, keys: Keys) -> Breadth | None:
    got = await redis.xrevrange(keys.events("market"), count=1)
    if not got:
        return None
    event = decode_event(got[0][0], got[0][1])
    assert isinstance(event, Breadth)
    return event


def figures(b: Breadth) -> dict[str, dict[str, Any]]:
    return {r.board: r.model_dump() for r in b.rows}


class Expect:
    """The latest breadth, compared with the brute force; the last difference kept for the failure."""

    def __init__(self, redis, keys: Keys):
        self.redis, self.keys = redis, keys
        self.diff: Any = None

    async def equals(self, written: list[Written]) -> bool:
        got = await latest_breadth(self.redis, self.keys)
        want = brute_force(written)
        if got is None:
            self.diff = "no breadth yet"
            return False
        have = figures(got)
        self.diff = {b: (have.get(b), want[b]) for b in want if have.get(b) != want[b]}
        return not self.diff


async def _owned_by(redis, keys: Keys, pid: int) -> int:
    owners = await redis.hgetall(keys.group("tickwave-join", "owners"))
    return sum(1 for owner in owners.values() if f"-{pid}-" in owner.decode())


def test_combining_partials_split_any_way_equals_the_computation_over_all_stocks():
    codes = [c for cs in seasoned_codes(12).values() for c in cs]
    market = Market(codes, seed=11)
    ticks = market.ticks(400)
    written = [Written(i % 7, i, t) for i, t in enumerate(ticks)]
    states: dict[str, list[Any]] = {}
    for w in written:
        states[w.tick.ts_code] = stock_state(w.tick, w.partition, w.offset)
    whole = combine(partials(states.values(), set(range(7)), 0), T0)
    # two "workers" each contributing some partitions, written in any order
    split = {**partials(states.values(), {0, 2, 4, 6}, 0), **partials(states.values(), {1, 3, 5}, 0)}
    assert whole is not None and combine(split, T0) == whole
    assert figures(whole) == brute_force(written)


async def test_two_workers_a_kill_and_a_restart_keep_breadth_equal_to_a_brute_force_count(
        redis_url, redis, keys, tmp_path: Path):
    by_board = seasoned_codes(25)
    codes = [c for cs in by_board.values() for c in cs]
    assert all(len(cs) == 25 for cs in by_board.values()), by_board
    market = Market(codes, seed=7)
    await topics(redis, keys)
    expect = Expect(redis, keys)
    # a few stocks traded only the day before: out of today's figures
    yesterday = await send_ticks(redis, keys, [market.tick(c, date(2026, 11, 23)) for c in codes[:6]])
    written = list(yesterday)
    # bad input is left out, not fatal
    await PartitionLog(redis, keys, "ticks").append(0, [encode_record(b"600000.SH", b"{not json")])
    a = JoinWorker(redis_url, keys, tmp_path, "a", **FAST).start()
    b = JoinWorker(redis_url, keys, tmp_path, "b", **FAST).start()
    assert a.proc is not None and b.proc is not None
    try:
        await wait_until(lambda: _both(redis, keys, a.proc.pid, b.proc.pid), 60,
                         "the two workers never shared the partitions", [a, b])
        written += await send_ticks(redis, keys, market.ticks(1500, codes[6:]))
        await wait_until(lambda: expect.equals(written), 60,
                         f"two workers' breadth never equalled the brute force: {expect.diff}", [a, b])

        async def feed() -> list[Written]:
            out: list[Written] = []
            for _ in range(20):
                out += await send_ticks(redis, keys, market.ticks(100))
                await asyncio.sleep(0.2)
            return out

        feeder = asyncio.create_task(feed())
        await asyncio.sleep(1.0)
        assert not feeder.done(), "the kill must land mid-stream"
        assert await _owned_by(redis, keys, a.proc.pid) > 0
        a.kill()
        written += await feeder
        await wait_until(lambda: expect.equals(written), 90,
                         f"after the kill the survivor's breadth never equalled the brute force: {expect.diff}", [b])
        assert b.stop() == 0, b.log()[-3000:]

        # a fresh worker (new data directory) sees only the ticks below: everything else of the
        # figures must come from the table recovered from its changelog
        c = JoinWorker(redis_url, keys, tmp_path, "c", **FAST).start()
        few = [market.tick(code) for code in (by_board["sh_main"][-1], by_board["star"][-1], by_board["beijing"][-1])]
        written += await send_ticks(redis, keys, few)
        try:
            await wait_until(lambda: expect.equals(written), 90,
                             f"after a restart the breadth never equalled the brute force: {expect.diff}", [c])
        finally:
            assert c.stop() == 0, c.log()[-3000:]
    finally:
        for w in (a, b):
            if w.alive():
                w.kill()


async def _both(redis, keys: Keys, pid_a: int, pid_b: int) -> bool:
    return await _owned_by(redis, keys, pid_a) > 0 and await _owned_by(redis, keys, pid_b) > 0
