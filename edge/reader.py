"""One blocking read per node over every stream it follows, on a connection of its own.

Streams are followed and dropped as subscribers come and go. The reader sends one
XREADGROUP (or XREAD, for tick partitions, which have no group) naming all of them,
so a node holds the same few Redis connections whether it follows one stream or a
thousand. When the set changes, the blocked read is cut short with CLIENT UNBLOCK,
sent from the shared pool, rather than waited out. The shared pool serves subscribes,
history, acks and lag; nothing blocks on it.

Redis Cluster refuses a multi-key read whose keys live in different slots, and every
strategy stream has a slot of its own (its hash tag), so there a blocking read per
slot would mean a connection per stream again. On a cluster the reader polls instead:
one non-blocking read per stream in one pipeline (redis-py sends one round trip per
cluster node), then a sleep of `poll_ms` when nothing came.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from streams import groups
from streams.codec import parse_id
from streams.connection import AnyRedis, is_cluster
from streams.errors import NoGroup, StreamsError, StreamUnavailable, translate, translated

log = logging.getLogger("tickwave.edge")

Entry = tuple[bytes, dict[bytes, bytes]]
Entries = list[tuple[str, list[Entry]]]

BLOCK_MS = 1000
# entries per read over all streams: COUNT per stream shrinks as the streams grow
MAX_ENTRIES = 10_000


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _entries(reply: Any) -> Entries:
    # a pending entry deleted by trimming comes back with no fields
    return [(_text(key), [(eid, fields) for eid, fields in entries if fields is not None])
            for key, entries in cast(list[tuple[Any, list[Any]]], reply or [])]


class Reader:
    """Reads a changing set of streams with one command at a time on a dedicated connection.

    `group` is (group, consumer) for XREADGROUP with `>`; without it, XREAD from each
    stream's cursor, which must be a concrete id (a `$` re-sent on every read would skip
    what arrived between two reads). `handle` gets every read's entries (possibly none,
    so it can do periodic work); `recover` gets the streams whose group is gone.
    """

    def __init__(
        self,
        name: str,
        open_connection: Callable[[], AnyRedis],
        control: AnyRedis,
        *,
        handle: Callable[[Entries], Awaitable[None]],
        group: tuple[str, str] | None = None,
        recover: Callable[[set[str]], Awaitable[None]] | None = None,
        poll_ms: int = 50,
        window_ms: float = 0,
    ):
        self.name = name
        self.window_s = window_ms / 1000
        self._last_data = 0.0
        self._open = open_connection
        self.control = control
        self.handle, self.group, self.recover = handle, group, recover
        self.poll_ms = poll_ms
        self.cursors: dict[str, str] = {}
        self.conn: AnyRedis | None = None
        self.cluster = False
        self.stopping = False
        self._gen = 0  # bumped on every change of the set of streams
        self._inflight: int | None = None  # the generation of the read under way
        self._client_id: int | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def follow(self, key: str, cursor: str) -> None:
        """Read `key` after `cursor` (`>` with a group); `interrupt` makes it take effect now."""
        self.cursors[key] = cursor
        self._changed()

    def unfollow(self, key: str) -> None:
        if self.cursors.pop(key, None) is not None:
            self._changed()

    def _changed(self) -> None:
        self._gen += 1
        self._wake.set()
        if self._task is None and not self.stopping:
            self.conn = self._open()
            self.cluster = is_cluster(self.conn)
            self._task = asyncio.create_task(self._run(), name=f"reader-{self.name}")

    async def interrupt(self) -> None:
        """Cut short a blocked read sent before the last change, so the next one names the
        current streams. Until the read is blocked in Redis, UNBLOCK finds nothing: retry."""
        if self.cluster:
            return  # polling: the next poll names the current streams
        deadline = time.monotonic() + BLOCK_MS / 1000
        while self._inflight is not None and self._inflight < self._gen:
            if self._client_id is not None:
                try:
                    with translated(f"unblock the {self.name} reader"):
                        if await self.control.client_unblock(self._client_id):
                            return
                except StreamsError:
                    return  # Redis away: the read fails too, and the next one names the current streams
            if time.monotonic() > deadline:
                # the read ended anyway (it came back with entries or after its block)... or
                # the connection changed under a stale id: the reader asks for it again
                self._client_id = None
                return
            await asyncio.sleep(0.002)

    async def stop(self) -> None:
        self.stopping = True
        self._gen += 1
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            await self.interrupt()
            done, _ = await asyncio.wait({task}, timeout=1.0)
            if not done:
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.conn is not None:
            with contextlib.suppress(Exception):  # noqa: BLE001 - closing a connection that may be broken
                await self.conn.aclose()
            self.conn = None

    async def _run(self) -> None:
        backoff = 0.2
        while not self.stopping:
            if not self.cursors:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._wake.clear()
            streams = dict(self.cursors)
            self._inflight = self._gen
            try:
                try:
                    got, missing = await (self._poll(streams) if self.cluster else self._block(streams))
                finally:
                    self._inflight = None
                if missing and self.recover is not None:
                    await self.recover(missing)
                self._advance(got)
                await self.handle(got)
                if self.window_s and any(entries for _, entries in got):
                    await self._gather_window()
                if self.cluster and not any(entries for _, entries in got):
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_ms / 1000)
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except NoGroup:
                # one of the streams was deleted (and maybe recreated): which one, Redis does not
                # say apart from its message; recreating a group that exists is a no-op
                if self.recover is not None:
                    await self._guarded(self.recover(set(streams)))
            except StreamUnavailable as exc:
                self._client_id = None  # a new connection comes with a new id
                if self.stopping:
                    return
                log.warning("redis unavailable; retrying", extra={"reader": self.name, "error": str(exc)})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5)
            except Exception:  # noqa: BLE001 - a dead reader would silently stop every push
                log.exception("reader failed; retrying", extra={"reader": self.name})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5)

    async def _gather_window(self) -> None:
        """Entries arriving faster than one read per window: wait out the rest of the window before
        the next read, so it takes all of them at once (one frame per subscriber, not one each).
        An entry after a quiet spell is read at once: a single event never waits for a timer."""
        now = time.monotonic()
        since, self._last_data = now - self._last_data, now
        if since < self.window_s:
            await asyncio.sleep(self.window_s - since)
            self._last_data = time.monotonic()

    async def _guarded(self, work: Awaitable[None]) -> None:
        try:
            await work
        except StreamUnavailable as exc:
            log.warning("redis unavailable; retrying", extra={"reader": self.name, "error": str(exc)})
            await asyncio.sleep(0.2)

    def _count(self, streams: int) -> int:
        return min(1000, max(10, MAX_ENTRIES // streams))

    async def _block(self, streams: dict[str, str]) -> tuple[Entries, set[str]]:
        conn = cast(Any, self.conn)
        if self._client_id is None:
            with translated(f"id of the {self.name} reader"):
                self._client_id = int(await conn.client_id())
        count = self._count(len(streams))
        if self.group is not None:
            return [(k, v) for k, v in await groups.read_group(
                conn, self.group[0], self.group[1], streams, count=count, block_ms=BLOCK_MS)], set()
        with translated(f"read {self.name}"):
            reply = await conn.xread(streams, count=count, block=BLOCK_MS)
        return _entries(reply), set()

    async def _poll(self, streams: dict[str, str]) -> tuple[Entries, set[str]]:
        pipe = cast(Any, self.conn).pipeline(transaction=False)
        count = self._count(len(streams))
        for key, cursor in streams.items():
            if self.group is not None:
                pipe.xreadgroup(self.group[0], self.group[1], {key: cursor}, count=count)
            else:
                pipe.xread({key: cursor}, count=count)
        try:
            with translated(f"read {self.name}"):
                replies = await pipe.execute(raise_on_error=False)
        finally:
            await pipe.reset()
        got: Entries = []
        missing: set[str] = set()
        for key, reply in zip(streams, replies):
            if isinstance(reply, BaseException):
                error = translate(reply, f"read {key}")
                if isinstance(error, NoGroup):
                    missing.add(key)
                    continue
                raise error
            got += _entries(reply)
        return got, missing

    def _advance(self, got: Entries) -> None:
        if self.group is not None:
            return  # `>` stays `>`: the group remembers where it is
        for key, entries in got:
            cursor = self.cursors.get(key)
            if entries and cursor is not None:
                last = _text(entries[-1][0])
                # the stream may have been dropped and followed again from a later id meanwhile
                if parse_id(last) > parse_id(cursor):
                    self.cursors[key] = last
