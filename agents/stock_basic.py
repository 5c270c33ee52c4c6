"""The universe from Tushare Pro: `stock_basic` for every listed A-share, `daily` for their last close.

Tushare Pro's HTTP API is one POST per call, `{"api_name", "token", "params", "fields"}`,
answered with `{"code": 0, "msg": "", "data": {"fields": [...], "items": [[...], ...]}}`;
a refusal (bad token, too few points, rate limit) has a non-zero code and the reason in
`msg`. Two calls make a universe: `stock_basic` (list_status L) and, for previous closes,
`daily` for the latest trading day that has closes.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime, timedelta
from typing import Any

import requests

from schemas.calendar import is_trading_day
from schemas.market import InvalidCode
from schemas.universe import Listing, Universe

API_URL = "http://api.tushare.pro"
BASIC_FIELDS = "ts_code,name,market,exchange,list_date"
DAILY_FIELDS = "ts_code,trade_date,close"
DAYS_BACK = 10  # trading days tried for closes: today's appear after the close, holidays have none


class TushareApiError(Exception):
    """A Tushare call that failed: unreachable, refused (with Tushare's reason) or unreadable."""


def call(api_name: str, token: str, params: dict[str, Any], fields: str, *, url: str = API_URL,
         timeout: float = 30.0) -> list[dict[str, Any]]:
    """One Tushare Pro call; its rows as dicts keyed by field name."""
    try:
        answer = requests.post(url, json={"api_name": api_name, "token": token, "params": params, "fields": fields},
                               timeout=timeout)
        answer.raise_for_status()
        body = answer.json()
    except requests.RequestException as exc:
        raise TushareApiError(f"{api_name}: cannot reach Tushare at {url}: {exc}") from None
    except ValueError:
        raise TushareApiError(f"{api_name}: Tushare answered with something other than JSON") from None
    if not isinstance(body, dict) or body.get("code") != 0:
        reason = body.get("msg") if isinstance(body, dict) else body
        code = body.get("code") if isinstance(body, dict) else "?"
        raise TushareApiError(f"{api_name}: Tushare refused (code {code}): {reason}")
    data = body.get("data") or {}
    names = data.get("fields") or []
    return [dict(zip(names, item)) for item in data.get("items") or []]


def _trading_days_back(today: date, count: int) -> list[date]:
    days: list[date] = []
    day = today
    while len(days) < count:
        if is_trading_day(day):
            days.append(day)
        day -= timedelta(days=1)
    return days


def latest_closes(token: str, today: date, *, url: str = API_URL,
                  progress: Callable[[str], None] = lambda _: None) -> tuple[date | None, dict[str, float]]:
    """Closes of the latest trading day up to `today` that has any, by ts_code."""
    for day in _trading_days_back(today, DAYS_BACK):
        rows = call("daily", token, {"trade_date": day.strftime("%Y%m%d")}, DAILY_FIELDS, url=url)
        if rows:
            progress(f"daily {day}: {len(rows)} closes")
            return day, {row["ts_code"]: float(row["close"]) for row in rows if row.get("close")}
        progress(f"daily {day}: no closes (yet)")
    return None, {}


def _list_date(text: Any) -> date | None:
    return datetime.strptime(str(text), "%Y%m%d").date() if text else None


def fetch_universe(token: str, *, today: date, prices: bool = True, url: str = API_URL,
                   progress: Callable[[str], None] = lambda _: None) -> Universe:
    """Every listed A-share from `stock_basic`, with the latest close from `daily` as pre_close."""
    rows = call("stock_basic", token, {"list_status": "L"}, BASIC_FIELDS, url=url)
    progress(f"stock_basic: {len(rows)} listed stocks")
    closes: dict[str, float] = {}
    if prices:
        day, closes = latest_closes(token, today, url=url, progress=progress)
        if day is None:
            progress(f"daily: no closes in the last {DAYS_BACK} trading days; writing no previous closes")
    listings, skipped = [], []
    for row in rows:
        try:
            listings.append(Listing.of(row["ts_code"], str(row.get("name") or ""), closes.get(row["ts_code"]),
                                       list_date=_list_date(row.get("list_date"))))
        except (InvalidCode, ValueError, KeyError):
            skipped.append(str(row.get("ts_code")))
    if skipped:
        progress(f"skipped {len(skipped)} rows that are not A-share listings: {', '.join(skipped[:5])}")
    if prices and closes:
        unpriced = [x.ts_code for x in listings if x.pre_close is None]
        if unpriced:
            progress(f"{len(unpriced)} without a close (suspended or not trading yet): {', '.join(unpriced[:5])}")
    return Universe(listings, source="tushare stock_basic")
