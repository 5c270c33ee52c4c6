"""Tushare real-time quotes (`realtime_quote(src="sina")`), polled for a code list.

Tushare checks the token with its own server on every call, then asks Sina's
quote endpoint; both go through `requests`. Failures are expected weather:
each kind is counted, logged once per streak, and polling backs off and
recovers by itself. Only a missing token stops the source, at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

from agents.sources import RawTick
from schemas.market import SHANGHAI, parse_ts_code

log = logging.getLogger("tickwave.ingest.tushare")

MAX_CODES_PER_CALL = 50  # Sina's list endpoint and Tushare's wrapper take at most this many


class TushareConfigError(ValueError):
    """The source cannot start (no token, no codes); names the variable."""


class SourceFailure(Exception):
    """One failed poll, with its kind: network, rate_limited, permission, empty, bad_response."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def classify(exc: BaseException) -> SourceFailure:
    """Sort an exception from tushare/requests into a failure kind."""
    import requests

    text = str(exc)
    if isinstance(exc, SourceFailure):
        return exc
    if isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return SourceFailure("network", text[:200])
    if any(marker in text for marker in ("每分钟最多", "频率", "rate limit", "too many", "Kinsoku")):
        return SourceFailure("rate_limited", text[:200])
    if isinstance(exc, PermissionError):
        return SourceFailure("permission", text[:200])
    return SourceFailure("bad_response", f"{type(exc).__name__}: {text[:200]}")


def rows_to_ticks(frame: Any) -> list[dict[str, Any]]:
    """Tushare's UPPERCASE columns to raw tick dicts (Beijing time, volume in shares, amount in yuan)."""
    ticks = []
    for row in frame.to_dict("records"):
        date, clock = str(row.get("DATE", "")), str(row.get("TIME", ""))
        try:
            moment = datetime.strptime(f"{date} {clock}", "%Y%m%d %H:%M:%S").replace(tzinfo=SHANGHAI)
        except ValueError:
            moment = None
        ticks.append({
            "ts_code": row.get("TS_CODE"), "name": str(row.get("NAME", "")),
            "time": moment.isoformat() if moment else None,
            "price": float(row["PRICE"]) if row.get("PRICE") not in (None, "") else None,
            "pre_close": float(row.get("PRE_CLOSE") or 0), "open": float(row.get("OPEN") or 0),
            "high": float(row.get("HIGH") or 0), "low": float(row.get("LOW") or 0),
            "volume": int(float(row.get("VOLUME") or 0)), "amount": float(row.get("AMOUNT") or 0),
            "bid1": float(row.get("BID") or 0), "ask1": float(row.get("ASK") or 0), "source": "tushare",
        })
    return ticks


def _realtime_quote(codes: list[str]) -> Any:
    """What `tushare.realtime_quote(src="sina")` does, with its refusal message kept.

    tushare's wrapper loses the server's reason when the token check fails (it
    formats `r.text` of a dict and raises AttributeError), so the rate-limit
    text never reaches the caller. The same two calls, in the same order, keep it.
    """
    # imported late: tushare is slow to import and pulls pandas
    from tushare.stock.rtq import get_realtime_quotes_sina
    from tushare.util.verify_token import verify_token

    token = os.environ.get("TUSHARE_TOKEN")
    answer = verify_token(token, "realtime_quote", "个股实时交易数据").json()
    if answer.get("message") != "success":
        raise PermissionError(str(answer.get("msg") or answer))
    return get_realtime_quotes_sina(",".join(codes))


class TushareSource:
    name = "tushare"

    def __init__(
        self,
        codes: list[str],
        *,
        token: str | None,
        interval: float = 3.0,
        retries: int = 2,
        max_backoff: float = 60.0,
        on_failure: Callable[[SourceFailure], None] | None = None,
        fetch: Callable[[list[str]], Any] = _realtime_quote,
    ):
        if not token:
            raise TushareConfigError("TICKWAVE_TUSHARE_TOKEN is not set: Tushare's realtime_quote needs a Pro token")
        if not codes:
            raise TushareConfigError("TICKWAVE_TUSHARE_CODES is empty: name the ts_codes to poll")
        self.codes = [parse_ts_code(c) for c in codes]
        # tushare reads the token from TUSHARE_TOKEN (or a file it writes in $HOME): the env keeps it in-process
        os.environ["TUSHARE_TOKEN"] = token
        self.interval, self.retries, self.max_backoff = interval, retries, max_backoff
        self.on_failure = on_failure
        self.fetch = fetch
        self.failing: str | None = None  # the kind of the current failure streak
        self.failures: Counter[str] = Counter()
        self.delay = interval

    def _chunks(self) -> list[list[str]]:
        return [self.codes[i:i + MAX_CODES_PER_CALL] for i in range(0, len(self.codes), MAX_CODES_PER_CALL)]

    async def poll(self) -> list[dict[str, Any]]:
        """One round over every chunk; raises SourceFailure if no chunk answered."""
        ticks: list[dict[str, Any]] = []
        failure: SourceFailure | None = None
        for chunk in self._chunks():
            for attempt in range(self.retries + 1):
                try:
                    frame = await asyncio.to_thread(self.fetch, chunk)
                    if frame is None or len(frame) == 0:
                        raise SourceFailure("empty", f"no rows for {len(chunk)} codes")
                    ticks += rows_to_ticks(frame)
                    break
                except Exception as exc:  # noqa: BLE001 - every failure is classified and survived
                    failure = classify(exc)
                    if failure.kind != "network" or attempt == self.retries:
                        break
                    await asyncio.sleep(0.2 * 2**attempt)
        if not ticks and failure is not None:
            raise failure
        return ticks

    def _failed(self, failure: SourceFailure) -> None:
        from agents.ingest import SOURCE_ERRORS

        SOURCE_ERRORS.labels(self.name, failure.kind).inc()
        self.failures[failure.kind] += 1
        if self.on_failure:
            self.on_failure(failure)
        if self.failing != failure.kind:  # once per streak, not once per poll
            log.warning("tushare poll failing", extra={"kind": failure.kind, "detail": failure.detail})
            self.failing = failure.kind
        self.delay = min(self.max_backoff, self.delay * 2) * random.uniform(0.9, 1.1)

    def _recovered(self) -> None:
        if self.failing is not None:
            log.info("tushare poll recovered", extra={"after": self.failing})
        self.failing = None
        self.delay = self.interval

    async def batches(self) -> AsyncIterator[list[RawTick]]:
        while True:
            try:
                ticks = await self.poll()
                self._recovered()
                yield list(ticks)
            except SourceFailure as failure:
                self._failed(failure)
            await asyncio.sleep(self.delay)
