"""A-share market rules as pure functions: codes, boards, limit bands, percentages."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from enum import Enum
from functools import lru_cache
from zoneinfo import ZoneInfo

from schemas.calendar import trading_day_number

SHANGHAI = ZoneInfo("Asia/Shanghai")

# The ST band moved from 5% to 10% for main-board ST stocks on this date.
ST_BAND_WIDENED_ON = date(2026, 7, 6)


class InvalidCode(ValueError):
    """A ts_code that names no A-share exchange listing."""


class Board(str, Enum):
    MAIN = "main"
    CHINEXT = "chinext"
    STAR = "star"
    BEIJING = "beijing"


_TS_CODE = re.compile(r"^(\d{6})\.(SH|SZ|BJ)$")
_PREFIXED = re.compile(r"^(SH|SZ|BJ)(\d{6})$")


def _exchange_for(digits: str) -> str:
    if digits.startswith(("60", "68", "90")):
        return "SH"
    if digits.startswith(("00", "30", "20")):
        return "SZ"
    if digits.startswith(("8", "43", "92")):
        return "BJ"
    raise InvalidCode(f"no A-share exchange lists code {digits!r}")


@lru_cache(maxsize=16384)
def parse_ts_code(raw: str) -> str:
    """Normalise `600519.SH`, `sh600519` or the old client's bare `600519` to `600519.SH`."""
    if not isinstance(raw, str):  # lru_cache: only hashable input gets here
        raise InvalidCode(f"ts_code must be a string, got {type(raw).__name__}")
    code = raw.strip().upper()
    m = _TS_CODE.match(code)
    if m:
        digits, exchange = m.groups()
        if _exchange_for(digits) != exchange:
            raise InvalidCode(f"{raw!r}: code {digits} is not listed on {exchange}")
        return code
    m = _PREFIXED.match(code)
    if m:
        return parse_ts_code(f"{m.group(2)}.{m.group(1)}")
    if len(code) == 6 and code.isdigit():
        return f"{code}.{_exchange_for(code)}"
    raise InvalidCode(f"{raw!r} is not a ts_code like 600519.SH or a six-digit code")


def bare_code(ts_code: str) -> str:
    """The six digits the old client calls `code`."""
    return ts_code.split(".", 1)[0]


def board_of(ts_code: str) -> Board:
    digits, exchange = parse_ts_code(ts_code).split(".")
    if exchange == "BJ":
        return Board.BEIJING
    if digits.startswith(("300", "301")):
        return Board.CHINEXT
    if digits.startswith(("688", "689")):
        return Board.STAR
    return Board.MAIN


def is_st(name: str | None) -> bool:
    """ST and *ST names carry the special-treatment band."""
    return bool(name) and "ST" in (name or "").upper().replace("＊", "*")


def limit_ratio(ts_code: str, name: str | None, trade_date: date, *, st: bool | None = None) -> Decimal:
    """The daily price limit as a fraction of the previous close; `st` overrides the name's ST mark."""
    board = board_of(ts_code)
    if board is Board.BEIJING:
        return Decimal("0.30")
    if board in (Board.CHINEXT, Board.STAR):
        return Decimal("0.20")
    if is_st(name) if st is None else st:
        return Decimal("0.10") if trade_date >= ST_BAND_WIDENED_ON else Decimal("0.05")
    return Decimal("0.10")


_FEN = Decimal("0.01")


@dataclass(frozen=True, slots=True)
class LimitBand:
    low: float
    high: float

    def contains(self, price: float) -> bool:
        return self.low <= price <= self.high

    @property
    def bounded(self) -> bool:
        return self.high != math.inf


# A new listing's first days trade without a price limit: one fen up to anything.
NO_LIMIT = LimitBand(low=0.01, high=math.inf)

# (board, listed on or after) -> how many of its first trading days have no limit. The
# registration reforms brought the rule: STAR from its opening, ChiNext from 2020-08-24,
# the SH/SZ main boards from 2023-04-10; Beijing's listings are free on the first day.
_FREE_DAYS_SINCE = {
    Board.STAR: (date(2019, 7, 22), 5),
    Board.CHINEXT: (date(2020, 8, 24), 5),
    Board.MAIN: (date(2023, 4, 10), 5),
    Board.BEIJING: (date(2021, 11, 15), 1),
}
# Main board and ChiNext listings from before their reform (2014 onwards) had an asymmetric
# first-day band around the issue price, +44% / -36%, and the usual band after it.
_OLD_FIRST_DAY = (Decimal("0.64"), Decimal("1.44"))
_OLD_FIRST_DAY_BOARDS = (Board.MAIN, Board.CHINEXT)


def unlimited_days(ts_code: str, list_date: date) -> int:
    """How many of a listing's first trading days have no price limit (0: none)."""
    since, days = _FREE_DAYS_SINCE[board_of(ts_code)]
    return days if list_date >= since else 0


def _at_fen(value: Decimal) -> float:
    return float(value.quantize(_FEN, rounding=ROUND_HALF_UP))


@lru_cache(maxsize=65536)
def limit_band(
    ts_code: str,
    name: str | None,
    pre_close: float,
    trade_date: date,
    *,
    list_date: date | None = None,
    st: bool | None = None,
) -> LimitBand:
    """Limit-down and limit-up prices, each rounded half-up to the fen.

    With `list_date`, a new listing in its first trading days gets NO_LIMIT (or the old
    first-day band); without it the stock is taken as seasoned. `st`, when known from
    the universe, overrides the ST mark read from the name.
    """
    if pre_close <= 0:
        raise ValueError("pre_close must be positive to have a limit band")
    base = Decimal(str(pre_close))
    if list_date is not None and trade_date >= list_date:
        free = unlimited_days(ts_code, list_date)
        day = trading_day_number(list_date, trade_date, stop_after=max(free, 1))
        if day <= free:
            return NO_LIMIT
        if free == 0 and day == 1 and board_of(ts_code) in _OLD_FIRST_DAY_BOARDS:
            low_ratio, high_ratio = _OLD_FIRST_DAY
            return LimitBand(low=_at_fen(base * low_ratio), high=_at_fen(base * high_ratio))
    ratio = limit_ratio(ts_code, name, trade_date, st=st)
    return LimitBand(low=_at_fen(base * (1 - ratio)), high=_at_fen(base * (1 + ratio)))


def percent_change(price: float, reference: float) -> float:
    """`(price - reference) / reference * 100`, rounded to 4 places; 0 when there is no reference."""
    if not reference:
        return 0.0
    return round((price - reference) / reference * 100, 4)


def change_since_signal(price: float, signal_price: float | None) -> float | None:
    """Percent move since the signal fired, or None when the signal carries no price."""
    if not signal_price:
        return None
    return percent_change(price, signal_price)
