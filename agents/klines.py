"""1-minute bars from ticks, as pure functions: what the kline agent (agents/analytics.py) keeps
per stock and how one tick, or the clock, changes it.

A stock's state is a JSON-able dict (the value of the agent's table, keyed by ts_code):
  day   the trading date the baselines belong to (ISO), or None
  vol   the highest cumulative volume seen today (the baseline a bar's volume is measured from)
  amt   the same for the cumulative amount
  off   the ticks-partition offset of the last tick applied: replays at or below it are skipped,
        so a changelog that ran ahead of the committed offsets is harmless
  t     the newest tick time seen (ms), for the partition's clock after a restart
  last  the start (ms) of the last bar closed: a tick for it or earlier is late
  bar   the open bar: s start ms, o h l c prices, n ticks, v0 a0 the baselines at its start
A bar's volume (amount) is the cumulative volume (amount) at its last tick less the baseline
at its start: the difference of the cumulative tick fields, so the bars of a day add up to the
day's cumulative figures. Ticks outside the session clock (schemas/klines.py) change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from schemas.events import Tick
from schemas.klines import MINUTE, Bar, SessionMode, bar_deadline, bar_start
from schemas.market import SHANGHAI

State = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What applying one tick did: `closed` bars (oldest first) and how the tick was taken."""

    state: State
    closed: tuple[Bar, ...]
    taken: str  # 'applied' | 'duplicate' | 'late' | 'outside'


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, SHANGHAI)


def new_state() -> State:
    return {"day": None, "vol": 0, "amt": 0.0, "off": -1, "t": 0, "last": None, "bar": None}


def open_bar(ts_code: str, state: State | None, *, closed: bool = False) -> Bar | None:
    """The stock's open bar as it stands (a live partial bar, `closed` False), or None."""
    current = state.get("bar") if state else None
    if not current or state is None:
        return None
    start = _at(current["s"])
    return Bar(ts_code=ts_code, start=start, end=start + MINUTE, open=current["o"], high=current["h"],
               low=current["l"], close=current["c"], volume=state["vol"] - current["v0"],
               amount=round(state["amt"] - current["a0"], 2), count=current["n"], closed=closed)


def close_bar(ts_code: str, state: State) -> tuple[State, Bar | None]:
    """The state with its open bar closed, and that bar (None when none was open)."""
    bar = open_bar(ts_code, state, closed=True)
    if bar is None:
        return state, None
    return {**state, "bar": None, "last": state["bar"]["s"]}, bar


def apply_tick(state: State | None, tick: Tick, offset: int, mode: SessionMode = "exchange") -> Outcome:
    """One tick (at `offset` of its partition) applied to its stock's state."""
    state = dict(state or new_state())
    if offset <= state["off"]:
        return Outcome(state, (), "duplicate")
    state["off"] = offset
    state["t"] = max(state["t"], _ms(tick.time))
    start = bar_start(tick.time, mode)
    if start is None:
        return Outcome(state, (), "outside")
    closed: list[Bar] = []
    day = start.date().isoformat()
    if day != state["day"]:
        state, bar = close_bar(tick.ts_code, state)
        if bar is not None:
            closed.append(bar)
        state.update(day=day, vol=0, amt=0.0, last=None)
    start_ms = _ms(start)
    current = state["bar"]
    if current and start_ms > current["s"]:
        state, bar = close_bar(tick.ts_code, state)
        closed.append(bar)  # type: ignore[arg-type]  # an open bar closes into a bar
        current = None
    if (current and start_ms < current["s"]) or (not current and state["last"] is not None
                                                   and start_ms <= state["last"]):
        return Outcome(state, tuple(closed), "late")
    if not current:
        current = {"s": start_ms, "o": tick.price, "h": tick.price, "l": tick.price, "c": tick.price, "n": 0,
                    "v0": state["vol"], "a0": state["amt"]}
    else:
        current = dict(current)
    current["h"] = max(current["h"], tick.price)
    current["l"] = min(current["l"], tick.price)
    current["c"] = tick.price
    current["n"] += 1
    state["bar"] = current
    state["vol"] = max(state["vol"], tick.volume)
    state["amt"] = max(state["amt"], tick.amount)
    return Outcome(state, tuple(closed), "applied")


def due_ms(state: State, grace_ms: int, mode: SessionMode = "exchange") -> int | None:
    """When (tick-time ms) the stock's open bar closes by the clock, or None when none is open."""
    current = state.get("bar")
    if not current:
        return None
    return _ms(bar_deadline(_at(current["s"]), mode) + timedelta(milliseconds=grace_ms))
