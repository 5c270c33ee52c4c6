"""What the edge app holds, typed for `app[state_key]`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from edge.auth import TokenVerifier
from edge.limits import AddressCounter
from edge.signal_lists import SignalLists
from edge.settings import EdgeSettings
from streams.archive import ArchiveStore
from streams.connection import AnyRedis
from streams.events import EventLog
from streams.keys import Keys

if TYPE_CHECKING:
    from edge.hub import Hub


@dataclass
class EdgeState:
    settings: EdgeSettings
    client: AnyRedis
    keys: Keys
    events: EventLog
    hub: Hub
    archive: ArchiveStore | None
    pool: Any
    verifier: TokenVerifier | None
    addresses: AddressCounter
    signal_lists: SignalLists | None = None  # with the pool: what the seed's list call answers
    sessions: set[Any] = field(default_factory=set)


state_key: web.AppKey[EdgeState] = web.AppKey("tickwave_edge", EdgeState)
