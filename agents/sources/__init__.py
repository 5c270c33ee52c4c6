"""Tick sources: each yields batches of ticks (or raw dicts to validate) as an async iterator."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from schemas.events import Tick

RawTick = Tick | Mapping[str, Any]


class Source(Protocol):
    name: str

    def batches(self) -> AsyncIterator[list[RawTick]]: ...
