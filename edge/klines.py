"""`kline` subscriptions and the kline HTTP API: one stock's bars, pushed as they close.

A subscription follows its stock's bar stream (`tw:kl:{klines.N}:CODE`) through the node's
one plain reader (the hub's `tick_reader`, no consumer group: resume is by event id), one
tail per stream however many clients watch it. Subscribe without `last_event_id`: the bars
of the newest bar's trading day as a snapshot frame; with it (and the epoch it came from):
every bar after it, then live ones, with no gap and no duplicate (live bars are buffered
while the replay is read, then only those after the last id sent go out). 5m, 15m and 1d
bars are derived from the 1-minute ones (schemas.klines.derive).
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

import orjson
from aiohttp import web

from edge import metrics
from edge.conn import Outgoing, Sender
from edge.reader import Entry, Reader
from schemas.klines import INTERVALS, Bar, bucket, derive
from schemas.market import SHANGHAI, InvalidCode, parse_ts_code
from schemas.messages import ErrorCode, ProtocolError, Subscribe, Subscribed, Unsubscribe, Unsubscribed
from streams.codec import parse_id
from streams.connection import AnyRedis
from streams.partition import partition_for
from streams.errors import CorruptEntry, translated
from streams.klines import BarArchive, BarLog, bar_history, decode_bar, decode_open

if TYPE_CHECKING:
    from edge.ws import Session

log = logging.getLogger("tickwave.edge")
Id = tuple[int, int]
DAY_MS = 24 * 3600 * 1000
LABEL = "*"  # kline subscriptions are counted together: codes are not a bounded label set
CSV_FIELDS = ("ts_code", "interval", "start", "end", "open", "high", "low", "close", "volume", "amount", "count",
              "closed", "event_id")


def frame(code: str, interval: str, epoch: str | None, bars: list[Bar], *, snapshot: bool = False,
          event_id: str | None = None) -> str:
    """`event_id`: the frame's, when not its last bar's (a live partial bar has none: the frame
    carries the last closed bar's id sent, where a reconnecting client resumes)."""
    return orjson.dumps({
        "type": "kline_update", "target": code, "interval": interval, "epoch": epoch,
        "event_id": event_id or (bars[-1].event_id if bars else None), "snapshot": snapshot,
        "data": [b.model_dump(mode="json") for b in bars],
    }).decode()


@dataclass(eq=False)
class KlineSub:
    """One client's subscription to one stock's bars at one interval."""

    code: str
    interval: str
    sender: Sender
    key: str = ""
    live_key: str = ""  # the partition's live stream of partial bars
    epoch: str | None = None
    seen: Id | None = None
    last_id: str | None = None  # the newest closed bar's id sent (or shown in the snapshot)
    last_start: datetime | None = None  # and its start: partial bars up to it are stale
    buffering: bool = True
    buffer: list[Bar] = field(default_factory=list)
    minutes: list[Bar] = field(default_factory=list)  # the 1-minute bars of the current derived bar

    def bars_for(self, ones: list[Bar]) -> list[Bar]:
        """The bars to send for new 1-minute bars: themselves, or each derived bar they changed."""
        if self.interval == "1m":
            return ones
        out: list[Bar] = []
        for one in ones:
            if self.minutes and bucket(self.minutes[0].start, self.interval) != bucket(one.start, self.interval):
                self.minutes = []
            self.minutes.append(one)
            latest = derive(self.minutes, self.interval)[-1]
            if out and out[-1].start == latest.start:
                out[-1] = latest
            else:
                out.append(latest)
        return out

    def deliver(self, bars: list[Bar]) -> None:
        if self.buffering:
            self.buffer.extend(bars)
            return
        fresh = [b for b in bars if self.seen is None or parse_id(b.event_id or "0-0") > self.seen]
        if not fresh:
            return
        self.seen = parse_id(fresh[-1].event_id or "0-0")
        self.last_id, self.last_start = fresh[-1].event_id, max(b.start for b in fresh)
        self.sender.put(Outgoing(frame(self.code, self.interval, self.epoch, self.bars_for(fresh)), "kline_update"),
                        may_conflate=False)

    def partial(self, bar: Bar) -> None:
        """A live partial 1-minute bar: sent as itself, or as the derived bar it makes so far."""
        if self.buffering or (self.last_start is not None and bar.start <= self.last_start):
            return  # before the subscription is live, or a bar already closed
        shown = bar
        if self.interval != "1m":
            current = bucket(bar.start, self.interval)
            minutes = [m for m in self.minutes if bucket(m.start, self.interval) == current]
            shown = derive([*minutes, bar], self.interval)[-1].model_copy(update={"closed": False, "event_id": None})
        self.sender.put(Outgoing(frame(self.code, self.interval, self.epoch, [shown], event_id=self.last_id),
                                 "kline_update"), may_conflate=False)

    def go_live(self, seen: Id | None) -> None:
        self.seen, self.buffering = seen, False
        pending, self.buffer = self.buffer, []
        if pending:
            self.deliver(pending)


class KlineTails:
    """The node's bar-stream tails: stream key -> its subscribers, read by the hub's plain reader."""

    def __init__(self, client: AnyRedis, reader: Reader):
        self.client, self.reader = client, reader
        self.subs: dict[str, set[KlineSub]] = {}
        self.key_of: dict[str, str] = {}  # ts_code -> its bar stream key, for the followed ones
        self.live: dict[str, int] = {}  # live stream key -> followed bar streams in its partition

    def __contains__(self, key: str) -> bool:
        return key in self.subs or key in self.live

    def __len__(self) -> int:
        """Streams followed: bar streams and live streams (each a tail of the node's reader)."""
        return len(self.subs) + len(self.live)

    async def _newest(self, key: str) -> str:
        """Where a tail of `key` starts: its newest entry now, as an id (entries from here on,
        none skipped between reads)."""
        with translated(f"tail of {key}"):
            newest = cast(list[Entry], await self.client.xrevrange(key, count=1))
        return newest[0][0].decode() if newest else "0-0"

    def needs(self, sub: KlineSub) -> int:
        """New tails (streams for the node's reader) the subscription would start."""
        if sub.key in self.subs:
            return 0
        return 1 + (1 if sub.live_key and sub.live_key not in self.live else 0)

    async def join(self, sub: KlineSub) -> None:
        """Follow the subscription's streams; on a Redis error nothing is followed or counted."""
        started = sub.key not in self.subs
        if started:
            keys = [sub.key] + ([sub.live_key] if sub.live_key and sub.live_key not in self.live else [])
            starts = [await self._newest(key) for key in keys]  # both read before either is followed
            for key, cursor in zip(keys, starts):
                self.reader.follow(key, cursor)
            if sub.live_key:
                self.live[sub.live_key] = self.live.get(sub.live_key, 0) + 1
            self.key_of[sub.code] = sub.key
        self.subs.setdefault(sub.key, set()).add(sub)
        metrics.SUBSCRIPTIONS.labels("kline", LABEL).inc()
        if started:
            await self.reader.interrupt()

    async def leave(self, sub: KlineSub) -> None:
        subs = self.subs.get(sub.key)
        if not subs or sub not in subs:
            return
        subs.discard(sub)
        metrics.SUBSCRIPTIONS.labels("kline", LABEL).dec()
        if not subs:
            del self.subs[sub.key]
            self.key_of.pop(sub.code, None)
            self.reader.unfollow(sub.key)
            if sub.live_key in self.live:
                self.live[sub.live_key] -= 1
                if not self.live[sub.live_key]:
                    del self.live[sub.live_key]
                    self.reader.unfollow(sub.live_key)
            await self.reader.interrupt()

    def dispatch(self, key: str, entries: list[Entry]) -> None:
        if key in self.live:
            for eid, fields in entries:
                try:
                    partials = decode_open(eid, fields, self.key_of)
                except CorruptEntry:
                    metrics.REFUSALS.labels("corrupt_bar").inc()
                    continue
                for bar in partials:
                    for sub in list(self.subs.get(self.key_of.get(bar.ts_code, ""), ())):
                        sub.partial(bar)
            return
        bars = []
        for eid, fields in entries:
            try:
                bars.append(decode_bar(eid, fields))
            except CorruptEntry:
                metrics.REFUSALS.labels("corrupt_bar").inc()
        for sub in list(self.subs.get(key, ())):
            sub.deliver(bars)


def _code(raw: str, request_id: Any = None) -> str:
    try:
        return parse_ts_code(raw)
    except InvalidCode as exc:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, str(exc), {"field": "target"}, request_id) from None


async def subscribe(session: Session, msg: Subscribe) -> bool:
    """A `kline` subscribe: follow the stock's bar stream, then replay or snapshot."""
    st = session.state
    code = _code(msg.target, msg.id)
    if not session.grant.allows(code):
        raise ProtocolError(ErrorCode.FORBIDDEN, f"this token may not subscribe to {code!r}", {"target": code}, msg.id)
    old = session.klines.pop((code, msg.interval), None)
    if old is not None:
        await st.hub.klines.leave(old)
    elif session.subscriptions() >= st.settings.edge_max_subscriptions:
        return await session.too_many(msg)
    partitions = await st.hub.tick_partitions()
    log_ = BarLog(st.client, st.keys)
    sub = KlineSub(code, msg.interval, session.sender, key=log_.stream_key(code, partitions),
                   live_key=st.keys.kline_live(partition_for(code, partitions)))
    await st.hub.join_kline(sub)  # live bars buffer from here on; NodeFull past the node's max tails
    session.klines[(code, msg.interval)] = sub
    try:
        await _replay_or_snapshot(session, sub, msg, log_, partitions)
    except Exception:
        session.klines.pop((code, msg.interval), None)
        await st.hub.klines.leave(sub)
        raise
    return True


async def _replay_or_snapshot(session: Session, sub: KlineSub, msg: Subscribe, log_: BarLog, partitions: int) -> None:
    st = session.state
    archive = BarArchive(st.pool) if st.pool is not None else None
    sub.epoch = await log_.epoch(partition_for(sub.code, partitions))
    if msg.last_event_id and sub.epoch is not None and msg.epoch in (None, sub.epoch):
        last = parse_id(msg.last_event_id)
        # from a day of appends before it: what a derived bar the client saw may still need
        got = await bar_history(log_, archive, sub.code, partitions, after_id=f"{max(0, last[0] - DAY_MS)}-0")
        if got.covered:
            done = [b for b in got.bars if parse_id(b.event_id or "0-0") <= last]
            replay = [b for b in got.bars if parse_id(b.event_id or "0-0") > last]
            if replay and done and sub.interval != "1m":
                # the derived bar the client last saw continues: seed it with its earlier minutes
                current = bucket(replay[0].start, sub.interval)
                sub.minutes = [b for b in done if bucket(b.start, sub.interval) == current]
            metrics.RESUMES.labels("true").inc()
            metrics.REPLAYED.inc(len(replay))
            newest = replay[-1].event_id if replay else msg.last_event_id
            shown_last = replay[-1] if replay else (done[-1] if done else None)
            sub.last_id, sub.last_start = newest, shown_last.start if shown_last else None
            session.sender.send(Subscribed(subscription_type="kline", target=sub.code, epoch=sub.epoch,
                                           event_id=newest, recovered=True, replayed=len(replay),
                                           interval=sub.interval, id=msg.id))
            for start in range(0, len(replay), 500):
                part = sub.bars_for(replay[start:start + 500])
                text = frame(sub.code, sub.interval, sub.epoch, part)
                if not await session.sender.wait_room(len(text)):
                    return
                session.sender.put(Outgoing(text, "replay"), may_conflate=False)
            sub.go_live(parse_id(newest) if newest else None)
            return
        metrics.RESUMES.labels("false").inc()
    day = await log_.day_of_newest(sub.key)
    newest_id = await log_.newest_id(sub.key)
    # the newest id first, then the day: a bar appended in between is both in the snapshot and
    # live (the live copy is left out: it is not after the snapshot's last id)
    session.sender.send(Subscribed(subscription_type="kline", target=sub.code, epoch=sub.epoch,
                                   event_id=newest_id, interval=sub.interval, id=msg.id))
    shown = derive(day, sub.interval)
    if sub.interval != "1m" and day:
        current = bucket(day[-1].start, sub.interval)
        sub.minutes = [b for b in day if bucket(b.start, sub.interval) == current]
    session.sender.put(Outgoing(frame(sub.code, sub.interval, sub.epoch, shown, snapshot=True), "kline_update"),
                       may_conflate=False)
    last_sent = day[-1].event_id if day else newest_id
    sub.last_id, sub.last_start = last_sent, day[-1].start if day else None
    sub.go_live(parse_id(last_sent) if last_sent else None)


async def unsubscribe(session: Session, msg: Unsubscribe) -> None:
    code = _code(msg.target, msg.id)
    sub = session.klines.pop((code, msg.interval), None)
    if sub is not None:
        await session.state.hub.klines.leave(sub)
    session.sender.send(Unsubscribed(subscription_type="kline", target=msg.target, id=msg.id))


def _bound(raw: str | None, name: str) -> tuple[str | None, datetime | None]:
    """An event id or an ISO time (naive: Beijing time)."""
    if not raw:
        return None, None
    try:
        parse_id(raw)
        return raw, None
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=orjson.dumps({"error": f"{name} must be an event id or an ISO time"}).decode(),
                                 content_type="application/json") from None
    return None, moment if moment.tzinfo else moment.replace(tzinfo=SHANGHAI)


async def kline_api(request: web.Request) -> web.StreamResponse:
    """GET /api/stocks/{ts_code}/kline?interval=1m&since=&until=&format=json|csv"""
    from edge.state import state_key

    st = request.app[state_key]

    def bad(message: str) -> web.Response:
        return web.json_response({"error": message}, status=400)

    try:
        code = parse_ts_code(request.match_info["ts_code"])
    except InvalidCode as exc:
        return bad(str(exc))
    interval = request.query.get("interval", "1m")
    if interval not in INTERVALS:
        return bad(f"interval must be one of {', '.join(INTERVALS)}")
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "csv"):
        return bad("format must be json or csv")
    since_id, since = _bound(request.query.get("since"), "since")
    until_id, until = _bound(request.query.get("until"), "until")
    archive = BarArchive(st.pool) if st.pool is not None else None
    got = await bar_history(BarLog(st.client, st.keys), archive, code, await st.hub.tick_partitions(),
                            after_id=since_id, since=since, until=until, until_id=until_id)
    bars = derive(got.bars, interval)
    if fmt == "json":
        return web.Response(body=orjson.dumps({"ts_code": code, "interval": interval, "covered": got.covered,
                                               "bars": [b.model_dump(mode="json") for b in bars]}),
                            content_type="application/json")
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for b in bars:
        writer.writerow(b.model_dump(mode="json"))
    return web.Response(text=out.getvalue(), content_type="text/csv", charset="utf-8",
                        headers={"X-Covered": "true" if got.covered else "false"})
