"""Outbound frames as JSON text, built straight from stored event bytes on the hot path.

The events were validated when appended; here they are only reshaped into the
old client's `price_update` rows by schemas.messages.price_row (a test checks that
every frame built here validates against the models).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from schemas.messages import price_row
from streams.codec import StoredEvent, parse_id


@dataclass(frozen=True, slots=True)
class Batch:
    """Events of one target read together: price rows plus signal changes, in id order."""

    target: str
    epoch: str | None
    first_id: str
    last_id: str
    ids: tuple[str, ...]
    prices: tuple[dict[str, Any], ...]  # PriceItem dicts; each carries its event_id
    signals: tuple[tuple[str, dict[str, Any]], ...]  # (id, SignalChange dict)
    ingest_ms: float | None  # oldest ingest time in the batch, for push latency
    breadth: tuple[tuple[str, dict[str, Any]], ...] = ()  # (id, Breadth dict): the `market` stream
    # first_id and last_id parsed once: every subscriber compares them with what it has seen
    first: tuple[int, int] = field(init=False)
    last: tuple[int, int] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "first", parse_id(self.first_id))
        object.__setattr__(self, "last", parse_id(self.last_id))


def _ingest_ms(doc: dict[str, Any]) -> float | None:
    try:
        return datetime.fromisoformat(doc["ingest_time"]).timestamp() * 1000
    except (KeyError, ValueError, TypeError):
        return None


def batch_of(
    target: str, epoch: str | None, events: Iterable[StoredEvent], *, latency: bool = True
) -> tuple[Batch | None, int]:
    """A Batch from stored events; returns it and how many entries were unreadable (skipped)."""
    ids, prices, signals, breadth = [], [], [], []
    oldest: float | None = None
    bad = 0
    for stored in events:
        try:
            doc = stored.doc()
            if stored.is_price:
                prices.append(price_row(stored.id, doc))
                ms = _ingest_ms(doc) if latency else None
                if ms is not None and (oldest is None or ms < oldest):
                    oldest = ms
            elif stored.is_breadth:
                breadth.append((stored.id, doc))
            else:
                signals.append((stored.id, doc))
            ids.append(stored.id)
        except (KeyError, ValueError, TypeError):  # orjson.JSONDecodeError is a ValueError
            bad += 1
    if not ids:
        return None, bad
    return Batch(target, epoch, ids[0], ids[-1], tuple(ids), tuple(prices), tuple(signals), oldest,
                 tuple(breadth)), bad


def price_update(target: str, epoch: str | None, rows: list[dict[str, Any]], *, snapshot: bool = False) -> str:
    return orjson.dumps({
        "type": "price_update", "data": rows, "count": len(rows), "target": target,
        "event_id": rows[-1]["event_id"] if rows else None, "epoch": epoch, "snapshot": snapshot,
    }).decode()


def signal_update(target: str, event_id: str, change: dict[str, Any]) -> str:
    return orjson.dumps({
        "type": "signal_update", "action": change["action"], "data": [change["signal"]], "count": 1,
        "target": target, "event_id": event_id,
    }).decode()


def ws_frame(payload: bytes) -> bytes:
    """One unfragmented, unmasked WebSocket text frame (RFC 6455 5.2), as a server sends it:
    built once per batch and written as is to every subscriber that has nothing queued."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload
