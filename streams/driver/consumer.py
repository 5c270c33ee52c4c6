"""The faust consumer on Redis Streams: fetch by dense offset, positions, group rebalancing.

Fetching is one XREAD over every active partition, from each partition's
position (its next offset), blocking briefly when there is nothing new.
Positions start at the committed offset, else at `consumer_auto_offset_reset`;
a position that trimming left behind follows the same policy.

Rebalancing follows Kafka's eager protocol over `group.Group`: when the
group's round moves on, this member revokes everything (faust's callbacks
stop the streams, wait for them and commit), joins the round, and once every
live member has joined, one of them runs faust's own PartitionAssignor and
writes the next generation; each member then gets faust's assign callback.
Heartbeats renew a lease in their own task, so a long revoke does not cost
the membership; a member that stops cleanly leaves at once.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, cast

from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from faust.assignor import PartitionAssignor
from faust.transport import consumer as base
from faust.types import TP, ConsumerMessage
from mode import Service
from redis.asyncio.cluster import RedisCluster

from streams.codec import GENERATION_HEADER, decode_record_parts, record_generation
from streams.deadletter import quarantine
from streams.driver import metrics
from streams.driver.group import Group, Reply
from streams.driver.logs import INFO, WARNING, Streak, note
from streams.errors import CorruptEntry, StreamUnavailable, translated

if TYPE_CHECKING:
    from streams.driver.transport import Transport


DEAD_LETTER_SOURCE = "driver"


class _Cluster:
    """The one thing faust's assignor asks of Kafka's cluster metadata."""

    def __init__(self, partitions: Mapping[str, int]):
        self._partitions = partitions

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        n = self._partitions.get(topic)
        return set(range(n)) if n else None


class Consumer(base.Consumer):
    """Reads topic partitions and takes part in the group's rebalances."""

    transport: Transport
    consumer_stopped_errors: ClassVar[tuple[type[BaseException], ...]] = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.member_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        self._assigned: set[TP] = set()
        self._positions: dict[TP, int] = {}
        # bumped by every seek: a fetch that was in flight across it is dropped, not applied
        self._seeks: defaultdict[TP, int] = defaultdict(int)
        self._highwaters: dict[TP, int] = {}
        # each partition's generation (gen, first offset) as last seen: see streams/append_records.lua
        self._gens: dict[TP, tuple[int, int]] = {}
        self._subscription: frozenset[str] = frozenset()
        self._subscription_changed = False
        self._needs_rebalance = asyncio.Event()
        self._rebalancing = False
        self._joined_round = -1
        self._generation = 0
        self._group: Group | None = None
        self._fetch_streak = Streak("fetch")

    # --- lifecycle -------------------------------------------------------------
    @property
    def group(self) -> Group:
        if self._group is None:
            opts = self.transport.options
            self._group = Group(
                self.transport.redis, self.transport.keys, self.app.conf.id, self.member_id,
                lease_ms=int(opts.session_timeout * 1000),
                rebalance_ms=int(self.app.conf.broker_rebalance_timeout * 1000),
            )
        return self._group

    async def on_start(self) -> None:
        await self.transport.acquire()
        note(INFO, "consumer started", group=self.app.conf.id, member=self.member_id)

    async def on_stop(self) -> None:
        await super().on_stop()
        if not self.app.client_only:
            await self.commit_all_acked()
        if self._joined_round >= 0:
            try:
                await asyncio.wait_for(self.group.leave(), 5.0)
                note(INFO, "left the group", group=self.app.conf.id, member=self.member_id)
            except (StreamUnavailable, asyncio.TimeoutError) as exc:
                note(WARNING, "could not leave the group; its lease will expire",
                            member=self.member_id, error=str(exc))
            self._joined_round = -1

    async def on_shutdown(self) -> None:
        self._group = None
        await self.transport.release()

    async def subscribe(self, topics: Iterable[str]) -> None:
        """Subscribe to topics (created as Kafka would auto-create them); starts a rebalance."""
        names = frozenset(topics)
        await self.transport.check_topics(sorted(names))
        settings = await self.transport.topics.ensure(sorted(names))
        if self.app.client_only:
            # a client (faust's start_client, for agent replies) reads everything from the end
            # and never joins the group: it would take partitions from the workers
            self._subscription = names
            self._assigned = {TP(t, p) for t, s in settings.items() for p in range(s.partitions)}
            return
        if names != self._subscription:
            self._subscription = names
            self._subscription_changed = True
            self._needs_rebalance.set()

    async def create_topic(
        self, topic: str, partitions: int, replication: int, *, config: Mapping[str, Any] | None = None,
        timeout: Any = 30.0, retention: Any = None, compacting: bool | None = None,
        deleting: bool | None = None, ensure_created: bool = False,
    ) -> None:
        """Declare a topic (see Transport.create_topic)."""
        await self.transport.create_topic(topic, partitions, config=config, retention=retention, compacting=compacting)

    # --- membership --------------------------------------------------------------
    @Service.task
    async def _heartbeats(self) -> None:
        streak = Streak("group heartbeat")
        interval_ms = int(self.transport.options.heartbeat_interval * 1000)
        after = b"$"
        while not self.should_stop:
            try:
                if after == b"$":
                    after = await self.group.last_wake()
                if self._joined_round >= 0:
                    reply = await self.group.heartbeat()
                    if not self._rebalancing and (reply.status == "evicted" or reply.round != self._joined_round):
                        if reply.status == "evicted":
                            note(WARNING, "lease expired: evicted from the group", member=self.member_id)
                        self._needs_rebalance.set()
                after = await self.group.wait(after, interval_ms)
                streak.ok()
            except StreamUnavailable as exc:
                await self.sleep(streak.failed(exc))

    @Service.task
    async def _rebalancer(self) -> None:
        streak = Streak("rebalance")
        while not self.should_stop:
            await self._needs_rebalance.wait()
            self._needs_rebalance.clear()
            if self.should_stop:
                break
            self._rebalancing = True
            try:
                await self._rebalance()
                streak.ok()
            except StreamUnavailable as exc:
                self._needs_rebalance.set()
                await self.sleep(streak.failed(exc))
            finally:
                self._rebalancing = False

    async def _rebalance(self) -> None:
        app = self.app
        metrics.REBALANCES.labels(app.conf.id).inc()
        app.on_rebalance_start()
        revoking = asyncio.ensure_future(self._revoke())
        try:
            done, _ = await asyncio.wait({revoking}, timeout=self._step_aside_after)
            if not done:
                await self._step_aside()
            await revoking
        except asyncio.CancelledError:
            revoking.cancel()
            raise
        metadata = self._assignor.metadata(set(self._subscription)).encode()
        changed, self._subscription_changed = self._subscription_changed, False
        group = self.group
        after = await group.last_wake()
        while not self.should_stop:
            reply = await group.join(metadata, changed=changed)
            changed = False
            self._joined_round = reply.round
            while not self.should_stop:
                reply = await group.sync(self._joined_round)
                if reply.status == "assigned":
                    await self._take(reply)
                    return
                if reply.status == "lead":
                    await self._lead(reply)
                elif reply.status == "wait":
                    after = await group.wait(after, 500)
                else:  # again / evicted: a newer round, join it
                    break

    async def _revoke(self) -> None:
        if self._assigned:
            await self._finish_in_flight_work()
        await self.on_partitions_revoked(set(self._assigned))
        self._forget_assignment()

    @property
    def _step_aside_after(self) -> float:
        """Longest a round waits for this member's revocation before it steps aside."""
        return min(self.transport.options.session_timeout / 2, self.app.conf.broker_rebalance_timeout)

    async def _step_aside(self) -> None:
        """Agents are still busy with events (a long call, a paused stream) and the revocation
        cannot finish: leave the group so that the round goes on without this member, instead
        of holding its partitions, unread, for the whole rebalance timeout. What it finished is
        committed first; the events still running are processed again by the next owner (their
        late commits are fenced), as after a kill. It joins again once they are done."""
        note(WARNING, "revocation held up by busy agents: stepping aside so the group moves on",
             member=self.member_id, after_s=self._step_aside_after)
        metrics.STEP_ASIDES.labels(self.app.conf.id).inc()
        try:
            await asyncio.wait_for(asyncio.shield(self.commit_all_acked()), 1.0)
        except asyncio.TimeoutError:
            pass  # still committing: it lands before the next generation, or is fenced
        try:
            await self.group.leave()
        except StreamUnavailable as exc:
            note(WARNING, "could not step aside; the lease will expire", member=self.member_id, error=str(exc))
            return
        self._joined_round = -1

    async def _finish_in_flight_work(self) -> None:
        """Stop handing out events, let the ones being processed finish and commit them, while
        this member still owns its partitions in its generation (nobody can be assigned them
        before it joins the new round, so the commit is accepted).

        faust's on_partitions_revoked forgets the acked but not yet committed offsets of the
        partitions it revokes before it waits for the streams and commits (faust/transport/
        consumer.py), so without this a rebalance loses up to a commit interval of progress
        and the next owner processes those messages again."""
        app = self.app
        self.stop_flow()
        app.flow_control.suspend()
        self.pause_partitions(self._assigned)
        app.flow_control.clear()  # events still queued for the agents: not started, so not lost
        if app.conf.stream_wait_empty:
            await self.wait_empty()  # commits as in-flight events finish
        await self.commit_all_acked()

    async def commit_all_acked(self) -> bool:
        """Commit every offset acked so far. faust's commit() returns without committing when
        another commit (the periodic one) is under way, and that one took its offsets before the
        latest acks: wait for it, then commit what is left."""
        while await self.maybe_wait_for_commit_to_finish():
            pass
        return await self.commit()

    async def _lead(self, reply: Reply) -> None:
        raw = reply.payload
        metadata = {
            (raw[i].decode() if isinstance(raw[i], bytes) else str(raw[i])): ConsumerProtocolMemberMetadata.decode(raw[i + 1])
            for i in range(0, len(raw), 2) if raw[i + 1] is not None
        }
        topics = sorted({t for md in metadata.values() for t in md.subscription})
        settings = await self.transport.topics.ensure(topics)
        assignment = self._assignor.assign(
            cast(Any, _Cluster({t: s.partitions for t, s in settings.items()})), metadata)
        owners: dict[TP, str] = {}
        for member, assigned in assignment.items():
            for topic, partitions in assigned.assignment:
                for p in partitions:
                    tp = TP(topic, p)
                    # a partition two members read (a global table's changelog) is shared
                    owners[tp] = member if tp not in owners else "*"
        written = await self.group.assign(reply.round, {m: a.encode() for m, a in assignment.items()}, owners)
        if written.status == "ok":
            note(INFO, "led the rebalance", group=self.app.conf.id, generation=written.generation,
                                                 members=len(metadata), partitions=len(owners))

    async def _take(self, reply: Reply) -> None:
        assignment = ConsumerProtocolMemberAssignment.decode(reply.payload[0])
        self._assignor.on_assignment(assignment)
        tps = {TP(topic, p) for topic, partitions in assignment.assignment for p in partitions}
        await self.transport.topics.ensure(sorted({tp.topic for tp in tps}))
        self._generation = reply.generation
        self._assigned = tps
        self.app.consumer_generation_id = reply.generation
        for topic in {tp.topic for tp in tps}:  # series at 0 from the start: increase() sees the first failover
            metrics.FAILOVER_REWINDS.labels(topic)
            metrics.FAILOVER_REREAD.labels(topic)
        note(INFO, "partitions assigned", group=self.app.conf.id, member=self.member_id,
                                               generation=reply.generation, partitions=len(tps))
        await self.on_partitions_assigned(tps, generation_id=reply.generation)

    def _forget_assignment(self) -> None:
        for tp in self._assigned:
            self._seeks[tp] += 1
        self._assigned = set()
        self._positions.clear()
        self._highwaters.clear()

    @property
    def _assignor(self) -> PartitionAssignor:
        return cast(PartitionAssignor, self.app.assignor)

    def assignment(self) -> set[TP]:
        return set(self._assigned)

    # --- positions -------------------------------------------------------------------
    async def _resolve(self, tps: Iterable[TP]) -> None:
        """Positions for partitions that have none: the committed offset, else the reset policy;
        also when the committed offset was trimmed away or is past the end."""
        tps = [tp for tp in tps if tp not in self._positions]
        if not tps:
            return
        # a rebalance or a seek while the offsets are read makes them stale: not applied
        seeks = {tp: self._seeks[tp] for tp in tps}
        client = self.app.client_only
        committed = {} if client else await self.group.committed_with_gens(tps)
        marks = await self.transport.topics.watermarks(tps)
        gens = await self._partition_gens(tps)
        latest = client or self.app.conf.consumer_auto_offset_reset == "latest"
        for tp in tps:
            if self._seeks[tp] != seeks[tp] or tp not in self._assigned:
                continue
            low, high = marks[tp]
            self._highwaters[tp] = high
            gen, start = self._gens[tp] = gens[tp]
            done = committed.get(tp)
            offset = self.transport.client_start(tp) if client else (done[0] if done else None)
            if done is not None and done[1] < gen and done[0] > start:
                # committed in an older generation past the point a failover rolled the partition
                # back to: the offsets from `start` on are new records, not the ones committed
                self._rewound(tp, done[0], start, "committed")
                offset = start
            if client and offset is not None:
                offset = max(offset, low)  # retention may have trimmed past it
            if offset is not None and offset < low and self._compacting(tp):
                low = offset  # compacted away, not trimmed (compacting topics never are): read on from there
            if offset is None or not low <= offset <= high:
                offset = high if latest else low
            self._positions[tp] = offset

    async def _partition_gens(self, tps: list[TP]) -> dict[TP, tuple[int, int]]:
        """Each partition's current generation (gen, first offset), (0, 0) before any failover."""
        client = self.transport.redis
        keys = self.transport.keys
        with translated("read partition generations"):
            raw = await asyncio.gather(*(client.hmget(keys.topic_generation(tp.topic, tp.partition), ["gen", "start"])
                                         for tp in tps))
        return {tp: (int(r[0] or 0), int(r[1] or 0)) for tp, r in zip(tps, raw)}

    def _rewound(self, tp: TP, position: int, start: int, seen_by: str) -> None:
        """Count and log a partition read past the offset a failover rolled it back to."""
        metrics.FAILOVER_REWINDS.labels(tp.topic).inc()
        metrics.FAILOVER_REREAD.labels(tp.topic).inc(max(0, position - start))
        note(WARNING, "partition rolled back by a failover: reading its new records from the rollback point",
             topic=tp.topic, partition=tp.partition, generation=self._gens[tp][0], position=position,
             rollback_to=start, reused_offsets=max(0, position - start), seen_by=seen_by)

    def _rewind(self, tp: TP, position: int, start: int) -> None:
        """Read `tp` again from `start`, forgetting faust's read, acked and committed offsets past
        it: they belong to records the failover lost, and new records now have those offsets."""
        self._rewound(tp, position, start, "fetch")
        self._set_position(tp, start)
        self._read_offset[tp] = start if start else None
        self._acked[tp].clear()
        self._acked_index[tp].clear()
        self._gap[tp].clear()
        self._committed_offset[tp] = None

    def _compacting(self, tp: TP) -> bool:
        settings = self.transport.topics.cached(tp.topic)
        return bool(settings and settings.compacting)

    def _set_position(self, tp: TP, offset: int | None) -> None:
        self._seeks[tp] += 1
        # None: faust's recovery had no offset for a standby partition yet (a rebalance came
        # between building the offsets and seeking them, tables/recovery.py); like its -1,
        # read the changelog from the start, which is never wrong, and the recovery restarts
        self._positions[tp] = max(0, int(offset)) if offset is not None else 0

    async def wait_empty(self) -> None:
        """Wait for the events being processed to be acked, committing as they are; a client
        (faust's start_client) commits nothing, and a reply its stream holds when the command
        finishes would keep the command from exiting."""
        if self.app.client_only:
            return
        await super().wait_empty()

    async def seek_to_committed(self) -> Mapping[TP, int]:
        """Seek every assigned partition to its committed offset; returns them."""
        committed = await self.group.committed(self._assigned)
        for tp, offset in committed.items():
            if offset is not None:
                self._set_position(tp, offset)
        return cast(Mapping[TP, int], committed)

    async def _seek(self, partition: TP, offset: int | None) -> None:
        self._set_position(partition, offset)

    async def seek_wait(self, partitions: Mapping[TP, int | None]) -> None:
        """Seek partitions (table recovery) and keep faust's read offsets in step."""
        for tp, offset in partitions.items():
            self._set_position(tp, offset)
            if offset is not None and offset > 0:
                self._read_offset[tp] = offset
            else:
                self._read_offset.pop(tp, None)

    async def position(self, tp: TP) -> int | None:
        await self._resolve([tp])
        return self._positions.get(tp)

    async def earliest_offsets(self, *partitions: TP) -> Mapping[TP, int]:
        return {tp: low for tp, (low, _high) in (await self.transport.topics.watermarks(partitions)).items()}

    async def highwaters(self, *partitions: TP) -> Mapping[TP, int]:
        marks = await self.transport.topics.watermarks(partitions)
        for tp, (_low, high) in marks.items():
            self._highwaters[tp] = high
        return {tp: high for tp, (_low, high) in marks.items()}

    def highwater(self, tp: TP) -> int:
        return self._highwaters.get(tp, 0)

    def topic_partitions(self, topic: str) -> int | None:
        settings = self.transport.topics.cached(topic)
        return settings.partitions if settings else None

    def key_partition(self, topic: str, key: bytes | None, partition: int | None = None) -> int | None:
        if partition is not None:
            return partition
        if key is None:
            return None
        return self.transport.producer_partition(topic, key)

    # --- commits ------------------------------------------------------------------------
    async def _commit(self, offsets: Mapping[TP, int]) -> bool:
        if not offsets:
            return False
        try:
            refused = await self.group.commit(self._generation, offsets,
                                              {tp: self._gens.get(tp, (0, 0))[0] for tp in offsets})
        except StreamUnavailable as exc:
            note(WARNING, "commit failed; it is retried with the next one", error=str(exc))
            return False
        if refused:
            metrics.COMMITS_FENCED.labels(self.app.conf.id).inc(len(refused))
            note(WARNING, "commit fenced: partitions belong to another member now",
                        member=self.member_id, generation=self._generation,
                               partitions=",".join(sorted(f"{tp.topic}/{tp.partition}" for tp in refused)))
            if not self._rebalancing:  # a rebalance under way already ends in a new generation
                self._needs_rebalance.set()
            return False
        return True

    # --- fetching -----------------------------------------------------------------------
    def _new_topicpartition(self, topic: str, partition: int) -> TP:
        return TP(topic, partition)

    def _to_message(self, tp: TP, record: Any) -> ConsumerMessage:
        return cast(ConsumerMessage, record)  # _getmany already built it

    def verify_event_path(self, now: float, tp: TP) -> None:
        return None

    @Service.task
    async def _watch_highwaters(self) -> None:
        """Keep highwater marks fresh for faust's lag monitor (fetches only raise them)."""
        while not self.should_stop:
            await self.sleep(self.transport.options.heartbeat_interval)
            if self._assigned:
                try:
                    await self.highwaters(*self._assigned)
                except StreamUnavailable:
                    pass  # the fetch loop reports the outage

    async def _getmany(self, active_partitions: set[TP] | None, timeout: float) -> base.RecordMap:
        assigned = self._assigned
        tps = [tp for tp in (assigned if active_partitions is None else active_partitions) if tp in assigned]
        if not tps:
            await asyncio.sleep(min(timeout, 0.1))
            return {}
        try:
            records = await self._fetch(tps, timeout)
        except StreamUnavailable as exc:
            await asyncio.sleep(self._fetch_streak.failed(exc))
            return {}
        self._fetch_streak.ok()
        return records

    async def _fetch(self, tps: list[TP], timeout: float) -> dict[TP, list[ConsumerMessage]]:
        await self._resolve(tps)
        # a rebalance while the positions were resolved may have taken some away
        tps = [tp for tp in tps if tp in self._positions and tp in self._assigned]
        if not tps:
            await asyncio.sleep(min(timeout, 0.1))
            return {}
        topics = self.transport.topics
        opts = self.transport.options
        seeks = {tp: self._seeks[tp] for tp in tps}
        by_key = {topics.stream(tp): tp for tp in tps}
        starts = {key: f"0-{self._positions[tp]}" for key, tp in by_key.items()}  # exclusive: offset n is 0-(n+1)
        client = self.transport.redis
        block_ms = max(1, int(min(timeout, opts.fetch_block) * 1000))
        reply: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]
        with translated("fetch"):
            if isinstance(client, RedisCluster):
                # every partition is its own slot: one non-blocking read each, then a short pause
                replies = await asyncio.gather(*(client.xread({k: s}, count=opts.max_poll_records)
                                                 for k, s in starts.items()))
                reply = [r for rs in replies for r in cast(list[Any], rs or [])]
                if not reply:
                    await asyncio.sleep(min(block_ms, 50) / 1000)
            else:
                reply = cast(list[Any], await client.xread(cast(Any, starts), count=opts.max_poll_records,
                                                           block=block_ms))
        out: dict[TP, list[ConsumerMessage]] = {}
        generation = self.app.consumer_generation_id
        latest = self.app.conf.consumer_auto_offset_reset == "latest"
        for raw_key, entries in reply or []:
            key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
            tp = by_key[key]
            if self._seeks[tp] != seeks[tp] or tp not in self._assigned or not entries:
                continue  # sought or revoked while the read was in flight
            position = read_from = self._positions[tp]
            # a gap in a compacting topic is compaction, not trimming: Kafka too reads on from there
            compacting = self._compacting(tp)
            messages: list[ConsumerMessage] = []
            bad: list[tuple[tuple[bytes, dict[bytes, bytes]], Exception]] = []
            rewind: int | None = None
            for entry_id, fields in entries:
                offset = int(entry_id[2:]) - 1
                gen, start = record_generation(fields)
                if gen > self._gens.get(tp, (0, 0))[0]:
                    self._gens[tp] = (gen, start)
                    if start < read_from:
                        rewind = start
                        break
                if offset > position and latest and not messages and not bad and not compacting:
                    # trimmed past this position: Kafka's OffsetOutOfRange, reset to the end
                    position = (await topics.watermarks([tp]))[tp][1]
                    break
                try:
                    messages.append(self._message(tp, offset, fields, generation))
                except CorruptEntry as exc:
                    bad.append(((entry_id, fields), exc))
                position = offset + 1
            if bad:
                # written before the position moves past them: a failed write re-reads them
                await quarantine(client, self.transport.keys, DEAD_LETTER_SOURCE, key, bad)
                metrics.CORRUPT.labels(tp.topic).inc(len(bad))
                note(WARNING, "corrupt records dead-lettered", topic=tp.topic, partition=tp.partition,
                                                                     records=len(bad), reason=str(bad[0][1]))
            if self._seeks[tp] != seeks[tp]:
                continue
            if rewind is not None:
                self._rewind(tp, read_from, rewind)
                continue
            self._positions[tp] = position
            if position > self._highwaters.get(tp, 0):
                self._highwaters[tp] = position
            if messages:
                out[tp] = messages
        return out

    def _message(self, tp: TP, offset: int, fields: dict[bytes, bytes], generation: int) -> ConsumerMessage:
        key, value, headers, ts_ms = decode_record_parts(fields)
        mark = fields.get(b"g")
        if mark:
            headers = [*headers, (GENERATION_HEADER, mark)]
        return ConsumerMessage(tp.topic, tp.partition, offset, ts_ms / 1000.0, 0, headers, key, value, None,
                               tp=tp, generation_id=generation)
