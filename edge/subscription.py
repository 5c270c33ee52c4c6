"""A client's subscription and the resume merge: pure, no I/O.

While a resume's replay is read, live batches from the node's tail are buffered;
`go_live` then sends only the buffered events newer than the last replayed id, and
from then on each live batch is delivered once, events at or before the last id
sent left out. This is what makes a resume gapless and free of duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge.conn import Outgoing, Sender
from edge.frames import Batch, price_update, signal_update
from edge.market import market_update
from streams.codec import parse_id

Id = tuple[int, int]


def outgoing(batch: Batch, after: Id | None = None) -> list[Outgoing]:
    """The frames of a batch for one subscriber, in event id order (a client resumes after the
    last id it saw, so a frame must never carry an id below one already sent); events at or
    before `after` are left out. Consecutive price rows share one price_update frame."""
    rows = list(batch.prices)
    signals = list(batch.signals)
    if after is not None:
        rows = [r for r in rows if parse_id(r["event_id"]) > after]
        signals = [(i, s) for i, s in signals if parse_id(i) > after]
    if batch.breadth:
        return breadth_frames(batch, after)
    out: list[Outgoing] = []

    def flush(run: list[dict[str, Any]]) -> None:
        if run:
            out.append(Outgoing(price_update(batch.target, batch.epoch, run), "price_update", batch.ingest_ms,
                                (batch.target, batch.epoch, run)))

    run: list[dict[str, Any]] = []
    pending = iter(signals)
    nxt = next(pending, None)
    for row in rows:
        while nxt is not None and parse_id(nxt[0]) < parse_id(row["event_id"]):
            flush(run)
            run = []
            out.append(Outgoing(signal_update(batch.target, nxt[0], nxt[1]), "signal_update"))
            nxt = next(pending, None)
        run.append(row)
    flush(run)
    while nxt is not None:
        out.append(Outgoing(signal_update(batch.target, nxt[0], nxt[1]), "signal_update"))
        nxt = next(pending, None)
    return out


def breadth_frames(batch: Batch, after: Id | None = None) -> list[Outgoing]:
    """A `market` stream batch: one market_update frame per breadth entry after `after` (the
    stream holds breadth entries only)."""
    return [Outgoing(market_update(batch.target, batch.epoch, i, doc), "market_update")
            for i, doc in batch.breadth if after is None or parse_id(i) > after]


@dataclass(eq=False)
class Subscription:
    """One client's subscription to one target; buffers live events while its replay runs."""

    kind: str
    target: str
    sender: Sender
    seen: Id | None = None
    code: str = ""  # the normalised ts_code of a stock subscription
    buffering: bool = True
    buffer: list[Batch] = field(default_factory=list)

    def deliver(self, batch: Batch, shared: list[Outgoing]) -> None:
        if self.buffering:
            self.buffer.append(batch)
            return
        seen = self.seen
        if seen is not None and batch.last <= seen:
            return
        items = shared if seen is None or batch.first > seen else outgoing(batch, seen)
        for item in items:
            self.sender.put(item)
        self.seen = batch.last

    def go_live(self, seen: Id | None) -> None:
        """End the replay: send buffered events newer than `seen`, then deliver live."""
        self.seen = seen
        self.buffering = False
        pending, self.buffer = self.buffer, []
        for batch in pending:
            self.deliver(batch, outgoing(batch))
