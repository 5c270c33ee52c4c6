"""The bodies of `GET /api/signals/buy`, rebuilt only when the signals change.

Each request asks PostgreSQL for the newest outbox id (an index lookup) and answers the body it
built at that id, or builds it again. Every change to the list commits outbox rows, and their
ids are handed out in commit order (streams/signals.py), so an unchanged id means an unchanged
list: the answer is as current as a fresh read. The id is read before the rows, so a change
committing between the two only makes the next request build again.
"""

from __future__ import annotations

from collections import OrderedDict

import orjson

from schemas.messages import signal_row
from streams.signals import SignalStore


class SignalLists:
    """Per-strategy list bodies of one edge node, the `size` most recently asked for."""

    def __init__(self, store: SignalStore, size: int = 64):
        self.store = store
        self.size = size
        self._bodies: OrderedDict[str, tuple[int, bytes]] = OrderedDict()

    async def buy(self, strategy: str) -> bytes:
        """The strategy's current buy signals as a `SignalList` JSON body; raises what the
        store raises (ArchiveUnavailable when PostgreSQL cannot be reached)."""
        version = await self.store.last_change()
        kept = self._bodies.get(strategy)
        if kept is not None and kept[0] == version:
            self._bodies.move_to_end(strategy)
            return kept[1]
        rows = [signal_row(r) for r in await self.store.records(strategy, side="buy")]
        # orjson writes the dates as ISO text
        body = orjson.dumps({"strategy": strategy, "data": rows, "count": len(rows)})
        self._bodies[strategy] = (version, body)
        self._bodies.move_to_end(strategy)
        while len(self._bodies) > self.size:
            self._bodies.popitem(last=False)
        return body
