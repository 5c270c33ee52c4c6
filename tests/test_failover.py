"""The whole pipeline on a Redis Cluster of three masters with one replica each, through two
master failovers (kill -9): the master of a busy ticks partition, then the master of the
strategy stream. Every process is a real OS process and carries on without a restart; what
each failover lost or repeated is measured here and compared with the product's own counters.

Replication on one machine is fast enough that a kill usually loses nothing (and a SIGSTOPped
replica loses nothing either: the kernel buffers what the master sent). To make the loss this
test is about certain, the replica is cut off its master's writes (LocalCluster.cut_replication)
and the master is killed only once the pipeline has used writes the replica will never have:
ticks the join turned into events, events the WebSocket clients were sent."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from schemas.events import PriceChange
from streams.codec import decode_event, decode_record, parse_id
from streams.connection import connect
from streams.events import EventLog
from streams.keys import Keys
from tests.driver_harness import wait_until
from tests.test_pipeline_processes import STRATEGY, Proc, events_of, pipeline_env, seed_signals
from tickwave import cluster as local_cluster
from tickwave.servers import free_port

PARTITIONS = 4


@dataclass
class Client:
    """A WebSocket subscriber that reconnects and resumes from its last id, as the app does, and
    remembers what each subscribe answered."""

    port: int
    seen: list[str] = field(default_factory=list)
    verdicts: list[bool | None] = field(default_factory=list)  # recovered per subscribe (None: fresh)
    closes: list[int] = field(default_factory=list)
    # ids seen since the last subscribe that answered recovered: false (or since the start)
    since_resync: list[str] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        last: str | None = None
        epoch: str | None = None
        while not stop.is_set():
            try:
                async with aiohttp.ClientSession() as s, s.ws_connect(
                        f"http://127.0.0.1:{self.port}/ws/stock/prices") as ws:
                    await ws.send_json({"type": "subscribe", "target": STRATEGY, "last_event_id": last,
                                        "epoch": epoch})
                    while not stop.is_set():
                        try:
                            msg = await ws.receive(timeout=0.5)
                        except asyncio.TimeoutError:
                            continue
                        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                            self.closes.append(ws.close_code or 0)
                            break
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            continue
                        data = msg.json()
                        if data["type"] == "subscribed":
                            epoch = data["epoch"]
                            recovered = data.get("recovered") if last else None
                            self.verdicts.append(recovered)
                            if recovered is False or last is None:
                                self.since_resync = []
                        elif data["type"] == "price_update" and not data.get("snapshot"):
                            ids = [row["event_id"] for row in data["data"]]
                            self.seen.extend(ids)
                            self.since_resync.extend(ids)
                            last = data["event_id"]
            except (aiohttp.ClientError, TypeError, ValueError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.3)


async def _metric(port: int, name: str) -> float:
    """Sum of a metric's samples on one process's /metrics."""
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


async def _tick_positions(client, keys: Keys, signalled: set[str]) -> dict[int, list[tuple[int, str]]]:
    """Per partition, (offset, ts_code) of every tick of a signalled stock, in offset order."""
    from schemas.events import Tick

    out: dict[int, list[tuple[int, str]]] = {}
    for p in range(PARTITIONS):
        rows = []
        for eid, fields in await client.xrange(keys.topic_partition("ticks", p)):
            record = decode_record(eid, fields)
            if record.value:
                code = Tick.model_validate_json(record.value).ts_code
                if code in signalled:
                    rows.append((record.offset, code))
        out[p] = rows
    return out


async def _ticks_by_position(client, keys: Keys, signalled: set[str]) -> dict[tuple[int, int], tuple[str, str, float]]:
    """(partition, offset) -> (ts_code, tick time, price) of every tick of a signalled stock."""
    from schemas.events import Tick

    out = {}
    for p in range(PARTITIONS):
        for eid, fields in await client.xrange(keys.topic_partition("ticks", p)):
            record = decode_record(eid, fields)
            if record.value:
                tick = Tick.model_validate_json(record.value)
                if tick.ts_code in signalled:
                    out[(p, record.offset)] = (tick.ts_code, tick.time.isoformat(), tick.price)
    return out


async def _next_offset(client, keys: Keys, p: int) -> int:
    return int(await client.get(keys.topic_sequence("ticks", p)) or 0)


async def _count_events(client, keys: Keys) -> int:
    try:
        return len(await events_of(client, keys))
    except Exception:  # noqa: BLE001 - a failover under way
        return -1


def _kill_and_promote(c: local_cluster.LocalCluster, master: local_cluster.Node,
                      replica: local_cluster.Node) -> float:
    """kill -9 a master whose replica was cut off; seconds until the replica serves in its place."""
    c.kill(master)
    c.restore_replication(replica)
    return c.wait_promoted(replica, 30)


@pytest.mark.timeout(300)
async def test_pipeline_carries_on_through_two_master_failovers(pg_url, keys, tmp_path: Path):
    c = local_cluster.LocalCluster(local_cluster.binary(), tmp_path / "cluster").start()
    client = connect(c.url)
    procs: dict[str, Proc] = {}
    stop_clients = asyncio.Event()
    readers: list[asyncio.Task[None]] = []
    try:
        signalled = await seed_signals(pg_url)
        env = {**pipeline_env(c.url, pg_url, keys), "TICKWAVE_TICK_PARTITIONS": str(PARTITIONS),
               "TICKWAVE_WORKER_REPLICA_WAIT_MS": "50"}
        ports = {name: free_port() for name in ("worker-a", "worker-b", "edge-a", "edge-b")}
        procs["relay"] = Proc("relay", ["relay"], env, tmp_path)
        procs["archive"] = Proc("archive", ["archive"], env, tmp_path)
        for name in ("worker-a", "worker-b"):
            procs[name] = Proc(name, ["worker"], {**env, "TICKWAVE_WORKER_METRICS_PORT": str(ports[name])}, tmp_path)
        for name in ("edge-a", "edge-b"):
            procs[name] = Proc(name, ["edge"], {**env, "TICKWAVE_EDGE_PORT": str(ports[name]),
                                                "TICKWAVE_EDGE_NODE": name}, tmp_path)

        async def signals_joined() -> bool:
            got = await client.xrange(keys.events(STRATEGY))
            return sum(1 for _, f in got if f[b"y"] == b"signal") >= len(signalled)

        await wait_until(signals_joined, 90, "the signals never reached the join", procs.values())  # type: ignore[arg-type]
        procs["ingest"] = Proc("ingest", ["ingest", "--source", "sim", "--stocks", "20", "--interval", "0.1",
                                          "--ignore-clock"], env, tmp_path)
        clients = [Client(ports["edge-a"]), Client(ports["edge-b"])]
        readers = [asyncio.create_task(cl.run(stop_clients)) for cl in clients]

        async def more_events(n: int) -> bool:
            return await _count_events(client, keys) > n

        await wait_until(lambda: more_events(100), 90, "no events before the failovers", procs.values())  # type: ignore[arg-type]

        # failover 1: the master of the busiest ticks partition that is not the strategy's master
        ticks = await _tick_positions(client, keys, signalled)
        strategy_master = c.master_of(keys.events(STRATEGY))
        busy = sorted(range(PARTITIONS), key=lambda p: -len(ticks[p]))
        p = next((q for q in busy if c.master_of(keys.topic_partition("ticks", q)).port != strategy_master.port),
                 busy[0])
        master = c.master_of(keys.topic_partition("ticks", p))
        replica = c.replica_of(master)
        await asyncio.to_thread(c.cut_replication, replica)
        cut_at = await _next_offset(client, keys, p)  # the replica has none of the ticks from here on

        async def joined_past(q: int, offset: int, n: int) -> bool:
            return sum(1 for e in await events_of(client, keys)
                       if e.source_partition == q and e.source_offset >= offset) >= n

        # the kill lands with work in flight: the master acknowledged ticks its replica lacks, and
        # the join already turned some of them into events
        await wait_until(lambda: joined_past(p, cut_at, 5), 30, "the join read no tick past the cut",
                         procs.values())  # type: ignore[arg-type]
        acked_1 = await _next_offset(client, keys, p)
        took_1 = await asyncio.to_thread(_kill_and_promote, c, master, replica)

        async def new_generation() -> bool:
            return int((await client.hget(keys.topic_generation("ticks", p), "gen")) or 0) >= 1

        await wait_until(new_generation, 30, "the promoted replica did not start a new generation of the partition",
                         procs.values())  # type: ignore[arg-type]
        gen = await client.hgetall(keys.topic_generation("ticks", p))
        rollback_to = int(gen[b"start"])
        assert rollback_to <= cut_at < acked_1, (rollback_to, cut_at, acked_1)
        rolled_back = {p: (rollback_to, acked_1)}
        before = await _count_events(client, keys)
        await wait_until(lambda: more_events(before + 100), 60, "events did not resume after failover 1",
                         procs.values())  # type: ignore[arg-type]

        # failover 2: the master of the strategy stream (it serves other slots too: every ticks
        # partition there rolls back as well)
        master = c.master_of(keys.events(STRATEGY))
        replica = c.replica_of(master)
        shared = [q for q in range(PARTITIONS) if c.master_of(keys.topic_partition("ticks", q)).port == master.port]
        await asyncio.to_thread(c.cut_replication, replica)
        cut_ids = await client.xrevrange(keys.events(STRATEGY), count=1)
        cut_id = parse_id(cut_ids[0][0].decode())
        cut_offsets = {q: await _next_offset(client, keys, q) for q in shared}

        async def clients_past_cut() -> bool:
            return all(sum(1 for i in cl.seen if parse_id(i) > cut_id) >= 3 for cl in clients)

        # in flight: the clients were sent events the replica lacks
        await wait_until(clients_past_cut, 30, "the clients were sent nothing past the cut",
                         procs.values())  # type: ignore[arg-type]
        acked_2 = {q: await _next_offset(client, keys, q) for q in shared}
        # the workers held still for the kill (SIGSTOP, a fraction of a second) so that what the
        # old master holds just before it dies is known exactly: the events it is about to lose
        workers = ("worker-a", "worker-b")
        for w in workers:
            os.kill(procs[w].proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(0.3)
            acked_2 = {q: await _next_offset(client, keys, q) for q in shared}
            last_seconds = await client.xrange(keys.events(STRATEGY), min=f"{cut_id[0] - 10_000}-0")
            await asyncio.to_thread(c.kill, master)
        finally:
            for w in workers:
                os.kill(procs[w].proc.pid, signal.SIGCONT)
        c.restore_replication(replica)
        took_2 = await asyncio.to_thread(c.wait_promoted, replica, 30)
        before = await _count_events(client, keys)
        await wait_until(lambda: more_events(before + 100), 60, "events did not resume after failover 2",
                         procs.values())  # type: ignore[arg-type]
        holes = await client.xrange(keys.failovers(STRATEGY))
        assert holes, "the strategy stream's failover was not recorded"
        kept_id = parse_id(holes[-1][1][b"after"].decode())
        assert kept_id <= cut_id, "the promoted replica holds events written after it was cut off"
        lost_2 = [e for e in (decode_event(i, f) for i, f in last_seconds)
                  if isinstance(e, PriceChange) and parse_id(e.event_id or "") > kept_id]
        for q in shared:
            g = await client.hgetall(keys.topic_generation("ticks", q))
            if g and int(g[b"start"]) < acked_2[q]:
                assert int(g[b"start"]) <= cut_offsets[q]
                rolled_back[q] = (int(g[b"start"]), acked_2[q])

        kept = holes[-1][1][b"after"].decode()
        first_new = parse_id((await client.xrange(keys.events(STRATEGY), min=f"({kept}", count=1))[0][0].decode())

        async def clients_live() -> bool:  # each client takes events the new master appended (after a resync)
            return all(cl.since_resync and parse_id(cl.since_resync[-1]) >= first_new for cl in clients)

        await wait_until(clients_live, 30, "a client did not take live events after failover 2",
                         procs.values())  # type: ignore[arg-type]
        down = [n for n, proc in procs.items() if not proc.alive()]
        assert not down, f"processes ended: {down}"

        code, _ = procs.pop("ingest").terminate(10)
        assert code == 0
        counts: list[int] = []

        async def settled() -> bool:  # the join caught up: no new event for two looks in a row
            counts.append(await _count_events(client, keys))
            await asyncio.sleep(1.0)
            return len(counts) >= 3 and counts[-1] == counts[-2] == counts[-3]

        await wait_until(settled, 60, "the join did not settle after the ingest stopped", procs.values())  # type: ignore[arg-type]
        held = await _ticks_by_position(client, keys, signalled)
        events = await events_of(client, keys)

        async def total(name: str, names: tuple[str, ...]) -> float:
            return sum([await _metric(ports[n], name) for n in names])

        reused = await total(f'tickwave_events_failover_reused_positions_total{{strategy="{STRATEGY}"}}', workers)
        rewinds = await total("tickwave_driver_failover_rewinds_total", workers)
        regressions = await total("tickwave_events_failover_regressions_total", workers)
        lost_counted = await total(f'tickwave_events_failover_lost_total{{strategy="{STRATEGY}"}}', workers)
        resyncs = await total("tickwave_edge_failover_resyncs_total", ("edge-a", "edge-b"))
        unreplicated = await total("tickwave_events_replica_unacknowledged_total", workers)

        # the exact account: an event is "current" when the tick its position names is the tick
        # the topic holds there now; every tick held has one current event, except those whose
        # event failover 2 lost; every other event is of a tick a failover lost, at an offset that
        # failover rolled back
        current = Counter((e.source_partition, e.source_offset) for e in events
                          if held.get((e.source_partition, e.source_offset))
                          == (e.ts_code, e.tick_time.isoformat(), e.price))
        assert max(current.values()) == 1, "a tick has two events"
        orphans = [(e.source_partition, e.source_offset) for e in events
                   if held.get((e.source_partition, e.source_offset)) != (e.ts_code, e.tick_time.isoformat(), e.price)]
        assert all(q in rolled_back and rolled_back[q][0] <= o < rolled_back[q][1] for q, o in orphans), \
            f"events of ticks no failover lost: {[x for x in orphans if x[0] not in rolled_back][:10]}"
        lost_1 = sorted(o for q, o in orphans if q == p)
        assert lost_1, "failover 1 lost no tick the join had read: the kill did not land with work in flight"
        without_event = sorted(pos for pos in held if pos not in current)
        # the fence forgot, per rolled-back partition, the positions from the rollback point to
        # the highest one it had recorded
        reused_per_partition = {q: max(o for q2, o in orphans if q2 == q) - rolled_back[q][0] + 1
                                for q in rolled_back if any(q2 == q for q2, _ in orphans)}
        expected_reused = sum(reused_per_partition.values())
        assert reused == expected_reused, f"the fence counted {reused} reused positions, expected {expected_reused}"
        assert rewinds >= 1, "no worker rewound the rolled-back partition"
        assert regressions >= 1, "no writer counted the strategy stream's failover"
        assert lost_2, "failover 2 lost no event: the kill did not land with work in flight"
        assert lost_counted == len(lost_2), f"the writers counted {lost_counted:.0f} events lost, the old master " \
                                            f"held {len(lost_2)} its replica never had"
        # a tick without an event is one whose event failover 2 lost (the others lost their tick too)
        assert without_event == sorted({(e.source_partition, e.source_offset) for e in lost_2
                                        if held.get((e.source_partition, e.source_offset))
                                        == (e.ts_code, e.tick_time.isoformat(), e.price)}), \
            "ticks without an event that no failover explains"

        # every client: what it was sent since its last fresh start is exactly the stream's
        # events in that range (gapless, no repeat), or it was told recovered: false
        await asyncio.sleep(2.0)
        stop_clients.set()
        await asyncio.gather(*readers)
        stream_ids = [i.decode() for i, f in await client.xrange(keys.events(STRATEGY)) if f[b"y"] == b"price"]
        for cl in clients:
            got = cl.since_resync
            assert got, (f"client of :{cl.port} received nothing after its last resync (verdicts {cl.verdicts}, "
                         f"closes {cl.closes}, {len(cl.seen)} events)")
            assert len(got) == len(set(got)), "a client was sent an event twice"
            lo, hi = parse_id(got[0]), parse_id(got[-1])
            assert got == [i for i in stream_ids if lo <= parse_id(i) <= hi], \
                f"client of :{cl.port} has a gap or a lost id without being told recovered: false"
        lost_ids = sum(1 for cl in clients for i in set(cl.seen) if i not in set(stream_ids))
        marked = sum(1 for cl in clients for v in cl.verdicts if v is False)
        assert lost_ids >= 1, "no client held an id failover 2 lost: the kill did not land with work in flight"
        assert resyncs >= 1 and marked >= 1, "clients held lost ids and none was closed to resync and told recovered: false"
        print(f"\nfailover 1 (ticks partition {p}): replica serving {took_1:.1f}s after the kill; rolled back to "
              f"offset {rollback_to}, {acked_1 - rollback_to} acknowledged ticks lost, {len(lost_1)} of them already "
              f"joined (their events stay); positions reused per partition {reused_per_partition} (the fence counted "
              f"{reused:.0f} in all), worker rewinds {rewinds:.0f}; rolled back: {rolled_back}")
        print(f"failover 2 (strategy stream, ticks partitions {shared} too): replica serving {took_2:.1f}s after "
              f"the kill; events lost {len(lost_2)} (writers counted {lost_counted:.0f}; {len(without_event)} of "
              f"their ticks survived, now without an event), regressions "
              f"counted {regressions:.0f}, ids clients held that the stream lost {lost_ids}, subscribers resynced "
              f"{resyncs:.0f}, resumes answered recovered:false {marked}; appends no replica acknowledged within "
              f"50 ms: {unreplicated:.0f}")
        for cl in clients:
            print(f"client :{cl.port}: {len(cl.seen)} events, verdicts {cl.verdicts}, closes {cl.closes}")
    finally:
        stop_clients.set()
        for task in readers:
            task.cancel()
        for proc in procs.values():
            if proc.alive():
                proc.proc.kill()
                proc.proc.wait(5)
        await client.aclose()
        c.stop()


async def test_wait_after_an_append_counts_what_no_replica_acknowledged_in_time(keys, tmp_path: Path):
    """WAIT runs on the append's own connection: with the replica stopped, the append still lands
    (the join goes on) after the bounded wait, and is counted; with it back, appends are acknowledged."""
    from streams.events import REPLICA_UNACKED
    from tests.factories import price_changes

    c = local_cluster.LocalCluster(local_cluster.binary(), tmp_path / "cluster").start()
    client = connect(c.url)
    strategy = "volume_wave"
    unacked = REPLICA_UNACKED.labels(strategy)
    try:
        log = EventLog(client, keys, replica_wait_ms=300)
        changes = price_changes(30)
        before = unacked._value.get()
        assert len(await log.append_events(strategy, changes[:10])) == 10
        assert len(await log.append_events(strategy, changes[10:20])) == 10
        assert unacked._value.get() == before, "an append the replica has was counted as not acknowledged"

        # several pooled connections to the master: WAIT on any but the append's own would see a
        # replica that has every write *of that connection* and return at once
        await asyncio.gather(*(client.xlen(keys.events(strategy)) for _ in range(8)))
        await asyncio.sleep(1.5)  # the replica acknowledges (once a second) what those connections saw
        replica = c.replica_of(c.master_of(keys.events(strategy)))
        os.kill(replica.pid, signal.SIGSTOP)  # connected, but acknowledging nothing
        try:
            started = time.monotonic()
            assert len(await log.append_events(strategy, changes[20:25])) == 5, "the append did not land"
            waited = time.monotonic() - started
        finally:
            os.kill(replica.pid, signal.SIGCONT)
        assert unacked._value.get() == before + 1, "an append no replica has was not counted"
        assert 0.3 <= waited < 5, f"WAIT was not bounded by 300 ms: {waited:.2f} s"

        await asyncio.to_thread(c.wait_healthy, 30)
        assert len(await log.append_events(strategy, changes[25:])) == 5
        assert unacked._value.get() == before + 1, "appends were not acknowledged once the replica was back"
    finally:
        await client.aclose()
        c.stop()
