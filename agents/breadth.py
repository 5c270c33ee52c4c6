"""Market breadth as pure functions: a stock's state from its tick, per-partition partials,
and the one market-wide figure combined from them.

The breadth agent (agents/worker.py) keeps `StockState` per ts_code in a faust table (so it
is partitioned like ticks, recovers from its changelog and moves with its partition). Every
interval each worker writes a `partial` for each ticks partition it owns; the worker holding
partition 0 combines every partition's partial into one `Breadth`.

Exactness: a partial carries its stocks' compact rows (board, sign, change in 1/10000 of a
percent, limit flag, amount), not sums, so the combination is the computation over all
stocks: counts are counts, the mean and the median are exact rationals over the 4-place
percent changes (rounded half-even to 4 places once, at the end), and the amount is one
`math.fsum` (correctly rounded, independent of partitioning) rounded to the fen. About
5,000 rows in all: tens of kilobytes per interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime
from fractions import Fraction
from typing import Any

from schemas.events import BREADTH_BOARDS, Breadth, BreadthBoard, BreadthRow, Tick
from schemas.market import SHANGHAI, Board, board_of, limit_band, percent_change
from schemas.universe import Listing

# index of each board in a state row; `all` is every row
BOARDS: tuple[BreadthBoard, ...] = BREADTH_BOARDS[1:]
_SH_MAIN, _SZ_MAIN, _CHINEXT, _STAR, _BEIJING = range(5)

# StockState: [partition, offset, trade date ordinal, board, sign, change, limit, amount, tick time ms]
#   sign: 1 above the previous close, -1 below, 0 at it; change: percent change * 10000 (an int);
#   limit: 1 at limit-up, -1 at limit-down, 0 neither. A list, so it is the table's JSON as is.
StockState = list[Any]
P, OFFSET, DATE, BOARD, SIGN, CHANGE, LIMIT, AMOUNT, TIME_MS = range(9)


def board_index(ts_code: str, board: Board) -> int:
    if board is Board.MAIN:
        return _SH_MAIN if ts_code.endswith(".SH") else _SZ_MAIN
    return {Board.CHINEXT: _CHINEXT, Board.STAR: _STAR, Board.BEIJING: _BEIJING}[board]


def stock_state(tick: Tick, partition: int, offset: int, listing: Listing | None = None) -> StockState:
    """One stock's breadth state after `tick` (at `partition`/`offset` of the ticks topic).
    The limit band is validation's: the tick's own name says ST, the universe's listing date
    frees a new listing's first days (no limit: never limit-up or limit-down)."""
    day = tick.time.astimezone(SHANGHAI).date()
    band = limit_band(tick.ts_code, tick.name, tick.pre_close, day,
                      list_date=listing.list_date if listing else None,
                      st=listing.st if listing and not tick.name else None)
    limit = 0
    if band.bounded:
        limit = 1 if tick.price >= band.high else -1 if tick.price <= band.low else 0
    sign = (tick.price > tick.pre_close) - (tick.price < tick.pre_close)
    return [partition, offset, day.toordinal(), board_index(tick.ts_code, board_of(tick.ts_code)), sign,
            round(percent_change(tick.price, tick.pre_close) * 10000), limit, float(tick.amount),
            int(tick.time.timestamp() * 1000)]


def newer(old: StockState | None, new: StockState) -> bool:
    """Whether `new` replaces `old`: a later tick of the partition (a tick consumed again after
    a restart, already in the recovered table, changes nothing)."""
    return old is None or old[P] != new[P] or new[OFFSET] > old[OFFSET]


def partials(states: Iterable[StockState], owned: set[int], at_ms: int) -> dict[int, dict[str, Any]]:
    """The partial of each owned partition with a stock in it: the highest tick offset applied
    (a partial replaces another only if not older), the partition's newest trade date, and the
    rows of the stocks whose latest tick is of that date."""
    by_p: dict[int, list[StockState]] = {}
    for s in states:
        if s[P] in owned:
            by_p.setdefault(s[P], []).append(s)
    out = {}
    for p, rows in by_p.items():
        day = max(r[DATE] for r in rows)
        out[p] = {
            "offset": max(r[OFFSET] for r in rows), "date": day, "at_ms": at_ms,
            "time_ms": max(r[TIME_MS] for r in rows if r[DATE] == day),
            "rows": [[r[BOARD], r[SIGN], r[CHANGE], r[LIMIT], r[AMOUNT]] for r in rows if r[DATE] == day],
        }
    return out


def _percent(value: Fraction) -> float:
    # round() on a Fraction is exact, half to even
    return float(round(value / 10000, 4))


def board_row(board: BreadthBoard, rows: Sequence[Sequence[Any]]) -> BreadthRow:
    """The breadth of `rows` ([board, sign, change, limit, amount] each)."""
    n = len(rows)
    changes = sorted(int(r[2]) for r in rows)
    if n:
        mean = _percent(Fraction(sum(changes), n))
        mid = n // 2
        median = _percent(Fraction(changes[mid]) if n % 2 else Fraction(changes[mid - 1] + changes[mid], 2))
    else:
        mean = median = 0.0
    return BreadthRow(
        board=board, advancers=sum(1 for r in rows if r[1] > 0), decliners=sum(1 for r in rows if r[1] < 0),
        unchanged=sum(1 for r in rows if r[1] == 0), limit_up=sum(1 for r in rows if r[3] > 0),
        limit_down=sum(1 for r in rows if r[3] < 0), mean_change_percent=mean, median_change_percent=median,
        amount=round(math.fsum(float(r[4]) for r in rows), 2), count=n,
    )


def combine(parts: Mapping[int, Mapping[str, Any]], computed_at: datetime) -> Breadth | None:
    """One market-wide Breadth from every partition's partial (None when there is none): the
    newest trade date's partials only (a partition whose newest tick is older has no stock
    trading that day), one row for `all` and one per board."""
    if not parts:
        return None
    day = max(int(p["date"]) for p in parts.values())
    today = [p for p in parts.values() if int(p["date"]) == day]
    rows = [r for p in today for r in p["rows"]]
    newest = max(int(p["time_ms"]) for p in today)
    by_board: list[list[Sequence[Any]]] = [[] for _ in BOARDS]
    for r in rows:
        by_board[int(r[0])].append(r)
    return Breadth(
        trade_date=date.fromordinal(day), time=datetime.fromtimestamp(newest / 1000, SHANGHAI),
        computed_at=computed_at,
        rows=[board_row("all", rows), *(board_row(b, by_board[i]) for i, b in enumerate(BOARDS))],
    )


def signature(parts: Mapping[int, Mapping[str, Any]]) -> tuple[tuple[int, int], ...]:
    """What a combination was computed from: (partition, offset) pairs; equal means equal figures."""
    return tuple(sorted((p, int(v["offset"])) for p, v in parts.items()))
