"""Per-strategy event streams: the pipeline's public record.

`EventLog.append_events` is the only way anything writes an event: one Lua
script per call (streams/append_events.lua) skips events whose tick position
is not newer than the last one recorded, appends the rest with Redis time ids
(the public event ids), keeps the snapshot hash and the epoch, and trims.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from importlib.resources import files
from typing import Any, cast

from schemas.events import PriceChange
from streams.codec import (
    CODEC_VERSION,
    Event,
    StoredEvent,
    decode,
    encode_event_parts,
    event_fields,
    lazy,
    parse_id,
)
from streams.connection import AnyRedis
from streams.errors import CorruptEntry, translated
from streams.keys import Keys, check_name

RawEntry = tuple[bytes, dict[bytes, bytes]]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


_APPEND_LUA = files("streams").joinpath("append_events.lua").read_text()
DEFAULT_RETENTION_MS = 24 * 3600 * 1000


Position = tuple[str, int]


def _event_args(event: Event, source: Position | None) -> list[bytes | str | int]:
    kind, version, body = encode_event_parts(event)
    if isinstance(event, PriceChange):
        position: list[bytes | str | int] = [event.source_partition, event.source_offset]
        snap: list[bytes | str | int] = [b"set", event.ts_code]
    else:
        position = [source[0], source[1]] if source else ["", 0]
        # a removed signal takes the stock out of the strategy's list
        snap = [b"del" if event.action == "remove" else b"", event.signal.ts_code]
    return [*position, *snap, kind, version, body]


class EventLog:
    """Append to and read the event streams of one deployment (one key prefix)."""

    def __init__(
        self,
        client: AnyRedis,
        keys: Keys,
        *,
        retention_ms: int | None = DEFAULT_RETENTION_MS,
        maxlen: int | None = None,
    ):
        self.client = client
        self.keys = keys
        if maxlen:
            self._retention: tuple[str, int] = ("maxlen", maxlen)
        elif retention_ms:
            self._retention = ("minid", retention_ms)
        else:
            self._retention = ("", 0)
        self._script = client.register_script(_APPEND_LUA)
        self._registered: set[str] = set()

    def stream_key(self, strategy: str) -> str:
        return self.keys.events(strategy)

    def _keys_for(self, strategy: str) -> list[str]:
        k = self.keys
        return [k.events(strategy), k.epoch(strategy), k.snapshot(strategy), k.positions(strategy)]

    async def append_events(
        self, strategy: str, events: Sequence[Event], *, sources: Sequence[Position | None] | None = None,
    ) -> list[str]:
        """Append atomically; returns the ids written (events at old positions are skipped).

        A PriceChange's position is its tick's (partition, offset). A SignalChange has
        none of its own: `sources` (aligned with `events`) can give one, a (name, offset)
        pair whose name must not be a tick partition number, e.g. ("signals.3", 17); a
        SignalChange without one is always appended.
        """
        check_name(strategy, "strategy")
        if not events:
            return []
        if sources is not None and len(sources) != len(events):
            raise ValueError("sources must have one entry per event")
        fresh_epoch = secrets.token_hex(8)
        args: list[Any] = [*self._retention, fresh_epoch, CODEC_VERSION]
        for i, event in enumerate(events):
            if isinstance(event, PriceChange) and event.strategy != strategy:
                raise ValueError(f"event for {event.strategy!r} appended to {strategy!r}")
            source = sources[i] if sources is not None else None
            if source is not None and source[0].isdigit():
                raise ValueError(f"source {source[0]!r} would share a tick partition's position")
            args.extend(_event_args(event, source))
        with translated(f"append events to {strategy}"):
            reply = await self._script(keys=self._keys_for(strategy), args=args)
            if strategy not in self._registered or _text(reply[0]) == fresh_epoch:
                # the strategies set lives on another slot: outside the script; registered again
                # when the stream is new (a Redis that lost its data lost the set too)
                await self.client.sadd(self.keys.strategies(), strategy)
                self._registered.add(strategy)
        return [_text(i) for i in reply[1:] if i is not None]

    async def read_after(
        self,
        strategy: str,
        after_id: str | None,
        *,
        until_id: str | None = None,
        count: int | None = None,
    ) -> list[StoredEvent]:
        """Events with id > after_id (and <= until_id), oldest first; corrupt entries raise."""
        low = f"({after_id}" if after_id else "-"
        with translated(f"read events of {strategy}"):
            raw = await self.client.xrange(self.stream_key(strategy), min=low, max=until_id or "+", count=count)
        return [lazy(eid, fields) for eid, fields in cast(list[RawEntry], raw or [])]

    async def _edge_id(self, strategy: str, newest: bool) -> str | None:
        with translated(f"read events of {strategy}"):
            key = self.stream_key(strategy)
            raw = cast(list[RawEntry], await (
                self.client.xrevrange(key, count=1) if newest else self.client.xrange(key, count=1)
            ))
        return _text(raw[0][0]) if raw else None

    async def latest_id(self, strategy: str) -> str | None:
        """Id of the newest event, or None for an empty or unknown stream."""
        return await self._edge_id(strategy, newest=True)

    async def first_id(self, strategy: str) -> str | None:
        """Id of the oldest event Redis still keeps."""
        return await self._edge_id(strategy, newest=False)

    async def origin_id(self, strategy: str) -> str | None:
        """Id of the first event ever appended in the current epoch (trimmed or not)."""
        with translated(f"read positions of {strategy}"):
            raw = await self.client.hget(self.keys.positions(strategy), "@first")
        return _text(raw) if raw else None

    async def epoch(self, strategy: str) -> str | None:
        with translated(f"read epoch of {strategy}"):
            raw = await self.client.get(self.keys.epoch(strategy))
        return _text(raw) if raw else None

    async def snapshot(self, strategy: str) -> list[StoredEvent]:
        """The latest event of every stock in the strategy, ordered by event id."""
        with translated(f"read snapshot of {strategy}"):
            raw = cast(dict[bytes, bytes], await self.client.hgetall(self.keys.snapshot(strategy)))
        out = []
        for value in raw.values():
            eid, version, body = value.split(b"\n", 2)
            try:
                out.append(decode(eid, event_fields(b"price", version, body)))
            except CorruptEntry:
                continue  # an unreadable snapshot row is replaced by the stock's next event
        return sorted(out, key=lambda s: parse_id(s.id))

    async def strategies(self) -> list[str]:
        """Every strategy that has had an event appended."""
        with translated("read strategies"):
            raw = await self.client.smembers(self.keys.strategies())
        return sorted(_text(s) for s in raw)

    async def is_strategy(self, name: str) -> bool:
        """Whether `name` has had an event appended (one SISMEMBER; creates nothing)."""
        with translated("check a strategy"):
            return bool(await self.client.sismember(self.keys.strategies(), name))

    async def length(self, strategy: str) -> int:
        """Events Redis holds for the strategy now."""
        with translated(f"length of {strategy}"):
            return int(await self.client.xlen(self.stream_key(strategy)))

    async def ping(self) -> None:
        """Raises StreamUnavailable when Redis does not answer."""
        with translated("ping"):
            await self.client.ping()


__all__ = ["EventLog", "RawEntry", "StoredEvent", "decode", "lazy", "parse_id"]
