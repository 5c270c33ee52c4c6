"""The Shanghai, Shenzhen and Beijing exchanges' trading days (one shared calendar).

Weekday closures for 2019-2026 come from the exchange calendars in the `adata`
wheel (2.9.5, Apache-2.0; see schemas/data/NOTICE). Outside those years every
weekday counts as a trading day: close enough for what this is used for, counting
a new listing's first few days, and it errs towards treating a stock as new.
"""

from __future__ import annotations

from datetime import date, timedelta

# month-day of every weekday the exchanges were (or will be) closed, by year
_CLOSED_WEEKDAYS = {
    2019: "01-01 02-04 02-05 02-06 02-07 02-08 04-05 05-01 05-02 05-03 06-07 09-13 10-01 10-02 10-03 10-04 10-07",
    2020: "01-01 01-24 01-27 01-28 01-29 01-30 01-31 04-06 05-01 05-04 05-05 06-25 06-26 10-01 10-02 10-05 10-06 "
          "10-07 10-08",
    2021: "01-01 02-11 02-12 02-15 02-16 02-17 04-05 05-03 05-04 05-05 06-14 09-20 09-21 10-01 10-04 10-05 10-06 "
          "10-07",
    2022: "01-03 01-31 02-01 02-02 02-03 02-04 04-04 04-05 05-02 05-03 05-04 06-03 09-12 10-03 10-04 10-05 10-06 "
          "10-07",
    2023: "01-02 01-23 01-24 01-25 01-26 01-27 04-05 05-01 05-02 05-03 06-22 06-23 09-29 10-02 10-03 10-04 10-05 "
          "10-06",
    2024: "01-01 02-09 02-12 02-13 02-14 02-15 02-16 04-04 04-05 05-01 05-02 05-03 06-10 09-16 09-17 10-01 10-02 "
          "10-03 10-04 10-07",
    2025: "01-01 01-28 01-29 01-30 01-31 02-03 02-04 04-04 05-01 05-02 05-05 06-02 10-01 10-02 10-03 10-06 10-07 "
          "10-08",
    2026: "01-01 01-02 02-16 02-17 02-18 02-19 02-20 02-23 04-06 05-01 05-04 05-05 06-19 09-25 10-01 10-02 10-05 "
          "10-06 10-07",
}
HOLIDAYS: frozenset[date] = frozenset(
    date.fromisoformat(f"{year}-{md}") for year, days in _CLOSED_WEEKDAYS.items() for md in days.split()
)
CALENDAR_YEARS = range(min(_CLOSED_WEEKDAYS), max(_CLOSED_WEEKDAYS) + 1)


def is_trading_day(day: date) -> bool:
    """A weekday the exchanges are open (holidays known for CALENDAR_YEARS)."""
    return day.weekday() < 5 and day not in HOLIDAYS


def trading_day_number(first: date, day: date, *, stop_after: int) -> int:
    """Which trading day `day` is, counting `first` as day 1 (0 if `day` is before `first`).

    Counts at most `stop_after` + 1: callers only ask whether a day is within the first few.
    """
    if day < first:
        return 0
    number = 0
    current = first
    while current <= day and number <= stop_after:
        if is_trading_day(current):
            number += 1
        current += timedelta(days=1)
    return number
