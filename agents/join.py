"""The join of ticks with the strategies' signals, as pure functions.

The faust agents (agents/worker.py) only read a message, call these, and
write: `apply_change` is how a signal change updates the table value of one
stock (strategy -> signal), `price_changes` turns one tick into one
PriceChange per strategy holding the stock, and `signal_source` gives a
signal change the position that makes its append exactly-once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from schemas.events import PriceChange, Signal, SignalChange, Tick

# header the relay stamps on every record of the signals topic
OUTBOX_HEADER = "outbox_id"

Held = dict[str, dict[str, Any]]  # one stock's table value: strategy -> Signal as JSON data


class BadTick(ValueError):
    """A ticks-topic record the join cannot use; `reason` names why (the dead-letter reason)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class BadSignalChange(ValueError):
    """A signals-topic record that is not a SignalChange."""


def parse_tick(value: bytes | None) -> Tick:
    """A tick from a ticks-topic value, or BadTick: undecodable, or a price the join cannot
    compute a change from (ingest refuses these too; other writers may not)."""
    if not value:
        raise BadTick("empty tick")
    try:
        tick = Tick.model_validate_json(value)
    except (ValidationError, ValueError) as exc:
        raise BadTick(f"undecodable tick: {str(exc).splitlines()[0]}") from None
    if not tick.price > 0:
        raise BadTick("zero or negative price")
    if not tick.pre_close > 0:
        raise BadTick("zero or negative previous close")
    return tick


def parse_change(value: bytes | None) -> SignalChange:
    """A signal change from a signals-topic value, or BadSignalChange."""
    try:
        return SignalChange.model_validate_json(value or b"")
    except (ValidationError, ValueError) as exc:
        raise BadSignalChange(f"undecodable signal change: {str(exc).splitlines()[0]}") from None


def apply_change(held: Mapping[str, Any] | None, change: SignalChange) -> Held:
    """One stock's table value after a change: the strategy's signal added (or replaced), or removed."""
    out: Held = dict(held or {})
    if change.action == "add":
        out[change.signal.strategy] = change.signal.model_dump(mode="json")
    else:
        out.pop(change.signal.strategy, None)
    return out


def signals_of(held: Mapping[str, Any] | None) -> list[Signal]:
    """The signals held for one stock, by strategy name."""
    held = held or {}
    return [Signal.model_validate(held[s]) for s in sorted(held)]


def price_changes(
    tick: Tick, signals: Sequence[Signal], *, ingest_time: datetime, partition: int, offset: int,
) -> list[PriceChange]:
    """One PriceChange per signal held on the tick's stock; the tick's position is the source."""
    return [
        PriceChange.from_tick(tick, signal, ingest_time=ingest_time, partition=partition, offset=offset)
        for signal in signals
        if signal.ts_code == tick.ts_code
    ]


def signal_source(partition: int, offset: int, headers: Sequence[tuple[str, bytes]] | Mapping[str, bytes] | None,
                  ) -> tuple[str, int]:
    """The position of a signal change in a strategy's stream: the relay's outbox id (per
    signals partition, so a record the relay wrote twice is appended once), or the record's
    offset when it came from elsewhere."""
    items = headers.items() if isinstance(headers, Mapping) else (headers or [])
    for name, raw in items:
        if name == OUTBOX_HEADER:
            try:
                return f"outbox.{partition}", int(raw)
            except ValueError:
                break
    return f"signals.{partition}", offset
