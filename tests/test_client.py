"""The Python client (tickwave.client) against a real edge: typed events, reconnect with backoff,
resume with no gap and no duplicate, a lost resume surfaced with its snapshot, heartbeats, JWT."""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

from schemas.messages import PriceItem
from streams.events import EventLog
from tests.driver_harness import wait_until
from tests.edge_harness import EdgeProcess, edge_settings, running_edge
from tests.factories import price_changes, signal_change
from tests.tcp_proxy import TcpProxy
from tests.test_edge_market import append as append_breadth
from tests.test_edge_market import breadth
from tickwave.client import (
    AuthRejected,
    Backoff,
    BreadthEvent,
    Disconnected,
    PriceEvent,
    Resumed,
    ResumeLost,
    SignalEvent,
    Snapshot,
    SubscribeRefused,
    subscribe,
    ws_url,
)

REPO = Path(__file__).resolve().parents[1]
S = "volume_wave"
FAST = Backoff(base=0.05, cap=0.4, jitter=0.5)
SECRET = "a-test-secret-of-at-least-32-bytes!"


class Collector:
    """Iterates a subscription in a task, keeping every event."""

    def __init__(self, sub):
        self.sub = sub
        self.events: list = []
        self.error: BaseException | None = None
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            async for event in self.sub:
                self.events.append(event)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            self.error = exc

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def ids(self) -> list[str]:
        return [e.event_id for e in self.events if isinstance(e, (PriceEvent, SignalEvent))]

    async def has(self, kind: type, n: int = 1) -> bool:
        if self.error is not None:
            raise self.error
        return len(self.of(kind)) >= n

    async def stop(self) -> None:
        self.sub.close()
        await asyncio.wait_for(self.task, 10)


async def writer(log: EventLog, start: int, total: int, batch: int = 5, pause: float = 0.02) -> list[str]:
    """Append `total` events in small batches, as the join does while a client is connected."""
    ids: list[str] = []
    for offset in range(start, start + total, batch):
        ids += await log.append_events(S, price_changes(batch, start=offset))
        await asyncio.sleep(pause)
    return ids


def after(ids: list[str], first: str | None) -> list[str]:
    def key(i: str) -> tuple[int, int]:
        ms, seq = i.split("-")
        return int(ms), int(seq)
    return [i for i in ids if first is None or key(i) > key(first)]


@pytest.mark.timeout(90)
async def test_resumes_across_a_killed_edge_with_no_gap_and_no_duplicate(redis_url, redis, keys):
    log = EventLog(redis, keys)
    before = await log.append_events(S, price_changes(30))
    node_a = EdgeProcess(redis_url, keys, "node-a")
    node_b = None
    await node_a.ready()
    proxy = await TcpProxy(node_a.port).start()
    got = Collector(subscribe(proxy.url, S, backoff=FAST, heartbeat=2.0))
    try:
        await wait_until(lambda: got.has(Snapshot), 10, "no snapshot")
        snap = got.of(Snapshot)[0]
        assert snap.event_id == before[-1]
        assert {r.ts_code: r.event_id for r in snap.rows} == {s.event.ts_code: s.id for s in await log.snapshot(S)}
        first_half = await writer(log, 30, 100)
        await wait_until(lambda: _holds(got, first_half[-1]), 10, "events before the kill did not arrive")
        node_a.kill()  # SIGKILL: the connection dies with the node, mid-stream
        writing = asyncio.create_task(writer(log, 130, 150))
        await asyncio.sleep(0.3)  # events appended while no node serves the client
        node_b = EdgeProcess(redis_url, keys, "node-b")
        proxy.point_to(node_b.port)
        await node_b.ready()
        second_half = await writing
        everything = before + first_half + second_half
        await wait_until(lambda: _holds(got, everything[-1]), 20, "events after the kill did not arrive")
        await got.stop()
        assert got.error is None
        assert got.ids() == after(everything, snap.event_id), "a gap or a duplicate across the kill"
        assert len(got.of(Snapshot)) == 1 and got.of(ResumeLost) == []
        assert len(got.of(Disconnected)) >= 1
        resumed = got.of(Resumed)
        assert len(resumed) == 1 and resumed[0].after_id in first_half and resumed[0].replayed > 0
        assert got.sub.last_event_id == everything[-1] and got.sub.epoch == await log.epoch(S)
        assert all(isinstance(e.item, PriceItem) and e.epoch == got.sub.epoch for e in got.of(PriceEvent))
    finally:
        got.sub.close()
        await proxy.close()
        for node in (node_a, node_b):
            if node is not None and node.proc.poll() is None:
                node.kill()


async def _holds(got: Collector, last_id: str) -> bool:
    if got.error is not None:
        raise got.error
    return last_id in got.ids()


async def test_a_lost_resume_is_surfaced_with_the_new_snapshot(redis_url, redis, keys):
    log = EventLog(redis, keys)
    await log.append_events(S, price_changes(12))
    old_epoch = await log.epoch(S)
    async with running_edge(edge_settings(redis_url, keys)) as base:
        proxy = await TcpProxy(int(base.rsplit(":", 1)[1])).start()
        got = Collector(subscribe(proxy.url, S, backoff=FAST))
        try:
            await wait_until(lambda: got.has(Snapshot), 10, "no snapshot")
            live = await log.append_events(S, price_changes(6, start=12))
            await wait_until(lambda: _holds(got, live[-1]), 10, "live events did not arrive")
            proxy.refusing = True
            proxy.cut()
            await wait_until(lambda: got.has(Disconnected), 10, "the cut went unnoticed")
            # the stream is recreated while the client is away: a new epoch, old ids mean nothing
            await redis.delete(keys.events(S))
            await log.append_events(S, price_changes(9, start=100))
            new_epoch = await log.epoch(S)
            assert new_epoch != old_epoch
            proxy.refusing = False
            await wait_until(lambda: got.has(ResumeLost), 10, "the lost resume was not surfaced")
            lost = got.of(ResumeLost)[0]
            assert (lost.after_id, lost.after_epoch) == (live[-1], old_epoch)
            assert lost.snapshot.epoch == new_epoch
            assert {r.ts_code: r.event_id for r in lost.snapshot.rows} == {
                s.event.ts_code: s.id for s in await log.snapshot(S)}
            later = await log.append_events(S, price_changes(4, start=109))
            await wait_until(lambda: _holds(got, later[-1]), 10, "live events after the snapshot did not arrive")
            await got.stop()
            assert got.ids() == live + later
            assert [type(e).__name__ for e in got.events if not isinstance(e, PriceEvent)][:1] == ["Snapshot"]
            assert got.sub.epoch == new_epoch and got.sub.last_event_id == later[-1]
        finally:
            got.sub.close()
            await proxy.close()


async def test_a_silent_connection_is_dropped_by_the_heartbeat_and_resumed(redis_url, redis, keys):
    log = EventLog(redis, keys)
    await log.append_events(S, price_changes(5))
    async with running_edge(edge_settings(redis_url, keys)) as base:
        proxy = await TcpProxy(int(base.rsplit(":", 1)[1])).start()
        got = Collector(subscribe(proxy.url, S, backoff=FAST, heartbeat=0.5))
        try:
            await wait_until(lambda: got.has(Snapshot), 10, "no snapshot")
            snap = got.of(Snapshot)[0]
            assert proxy.freeze() == 1  # the path dies: no close, no reset, nothing
            frozen_at = time.monotonic()
            ids = await log.append_events(S, price_changes(20, start=5))
            await wait_until(lambda: got.has(Disconnected), 5, "a silent connection was not noticed")
            noticed = time.monotonic() - frozen_at
            await wait_until(lambda: _holds(got, ids[-1]), 10, "no resume after the silent connection")
            await got.stop()
            assert noticed < 3.0, f"took {noticed:.1f}s to notice with a 0.5s heartbeat (about 0.75s expected)"
            assert "PONG" in got.of(Disconnected)[0].reason
            assert got.ids() == after(ids, snap.event_id)
            assert len(got.of(Resumed)) == 1
        finally:
            got.sub.close()
            await proxy.close()


async def test_the_edges_pings_are_answered_so_a_quiet_subscription_stays_open(redis_url, redis, keys):
    log = EventLog(redis, keys)
    await log.append_events(S, price_changes(3))
    # the edge closes a client that answers no ping within half its heartbeat
    async with running_edge(edge_settings(redis_url, keys, edge_heartbeat_s=0.3)) as base:
        async with subscribe(base, S, heartbeat=None) as sub:
            got = Collector(sub)
            await wait_until(lambda: got.has(Snapshot), 10, "no snapshot")
            await asyncio.sleep(2.0)  # many heartbeats with nothing to send
            ids = await log.append_events(S, price_changes(2, start=3))
            await wait_until(lambda: _holds(got, ids[-1]), 10, "no events after a quiet spell")
        await asyncio.wait_for(got.task, 10)
        assert got.of(Disconnected) == [] and got.sub.connections == 1


async def test_leaving_the_block_closes_the_connection_at_once(redis_url, redis, keys):
    await EventLog(redis, keys).append_events(S, price_changes(3))
    async with running_edge(edge_settings(redis_url, keys)) as base:
        async with subscribe(base, S) as sub:
            async for event in sub:
                assert isinstance(event, Snapshot)
                break
        assert sub._iterator is not None and sub._iterator.ag_frame is None  # finished, its session closed


async def test_reconnects_with_exponential_backoff_while_the_edge_is_unreachable(redis_url, redis, keys):
    await EventLog(redis, keys).append_events(S, price_changes(3))
    async with running_edge(edge_settings(redis_url, keys)) as base:
        proxy = await TcpProxy(int(base.rsplit(":", 1)[1])).start()
        proxy.refusing = True
        got = Collector(subscribe(proxy.url, S, backoff=Backoff(base=0.02, cap=0.16, jitter=0.0)))
        try:
            await wait_until(lambda: got.has(Disconnected, 6), 10, "no retries")
            proxy.refusing = False
            await wait_until(lambda: got.has(Snapshot), 10, "no snapshot once the edge is reachable")
            await got.stop()
            waits = [d.retry_in for d in got.of(Disconnected)]
            assert waits[:6] == pytest.approx([0.02, 0.04, 0.08, 0.16, 0.16, 0.16])
            assert [d.attempt for d in got.of(Disconnected)][:6] == [1, 2, 3, 4, 5, 6]
        finally:
            got.sub.close()
            await proxy.close()


def test_backoff_grows_exponentially_up_to_the_cap_with_jitter_below_it():
    plain = Backoff(base=0.5, cap=8, jitter=0)
    assert [plain.delay(a) for a in range(7)] == [0.5, 1, 2, 4, 8, 8, 8]
    rng = random.Random(7)
    jittered = [Backoff(base=0.5, cap=8, jitter=0.5).delay(a, rng) for a in range(200)]
    full = [min(8, 0.5 * 2 ** a) for a in range(200)]
    assert all(f / 2 <= d <= f for d, f in zip(jittered, full))
    assert len({round(d / f, 6) for d, f in zip(jittered, full)}) > 150, "no jitter"
    with pytest.raises(ValueError):
        Backoff(base=1, cap=0.5)


async def test_close_ends_the_iteration_while_waiting_for_events_or_for_a_retry(redis_url, redis, keys):
    await EventLog(redis, keys).append_events(S, price_changes(3))
    async with running_edge(edge_settings(redis_url, keys)) as base:
        got = Collector(subscribe(base, S))
        await wait_until(lambda: got.has(Snapshot), 10, "no snapshot")
        started = time.monotonic()
        await got.stop()  # waiting in receive()
        assert time.monotonic() - started < 2
    got = Collector(subscribe("http://127.0.0.1:1", S, backoff=Backoff(base=30, cap=30, jitter=0)))
    await wait_until(lambda: got.has(Disconnected), 10, "no failed connect")
    started = time.monotonic()
    await got.stop()  # waiting out a 30 s backoff
    assert time.monotonic() - started < 2 and got.error is None


async def test_signal_changes_arrive_typed_in_order_with_prices(redis_url, redis, keys):
    log = EventLog(redis, keys)
    await log.append_events(S, price_changes(3))
    async with running_edge(edge_settings(redis_url, keys)) as base:
        got = Collector(subscribe(base, S))
        try:
            await wait_until(lambda: got.has(Snapshot), 10, "no snapshot")
            added = await log.append_events(S, [signal_change("add", ts_code="000001.SZ")])
            prices = await log.append_events(S, price_changes(2, start=3))
            await wait_until(lambda: _holds(got, prices[-1]), 10, "events did not arrive")
            await got.stop()
            assert got.ids() == added + prices
            signal = got.of(SignalEvent)[0]
            assert (signal.change.action, signal.change.signal.ts_code) == ("add", "000001.SZ")
        finally:
            got.sub.close()


def token(secret: str, strategies: list[str] | str = "*") -> str:
    return jwt.encode({"sub": "sdk-test", "strategies": strategies, "exp": int(time.time()) + 300}, secret,
                      algorithm="HS256")


@pytest.mark.parametrize("token_in", ["header", "query"])
async def test_jwt_is_sent_and_fetched_again_for_every_connection(redis_url, redis, keys, token_in):
    await EventLog(redis, keys).append_events(S, price_changes(3))
    async with running_edge(edge_settings(redis_url, keys, edge_jwt_secret=SECRET)) as base:
        proxy = await TcpProxy(int(base.rsplit(":", 1)[1])).start()
        calls = []

        async def fresh() -> str:
            calls.append(1)
            return token(SECRET)
        got = Collector(subscribe(proxy.url, S, token=fresh, token_in=token_in, backoff=FAST))
        try:
            await wait_until(lambda: got.has(Snapshot), 10, "no snapshot with a good token")
            proxy.cut()
            await wait_until(lambda: got.has(Resumed), 10, "no resume with a fresh token")
            await got.stop()
            assert len(calls) == 2
        finally:
            got.sub.close()
            await proxy.close()


async def test_a_refused_token_or_target_raises_instead_of_retrying(redis_url, redis, keys):
    await EventLog(redis, keys).append_events(S, price_changes(3))
    async with running_edge(edge_settings(redis_url, keys, edge_jwt_secret=SECRET)) as base:
        got = Collector(subscribe(base, S, token=token("wrong-" + SECRET), backoff=FAST))
        await asyncio.wait_for(got.task, 10)
        assert isinstance(got.error, AuthRejected) and "bad token" in str(got.error)
        assert got.of(Disconnected) == []
        got = Collector(subscribe(base, S, token=token(SECRET, ["other"]), token_in="query", backoff=FAST))
        await asyncio.wait_for(got.task, 10)
        assert isinstance(got.error, SubscribeRefused) and got.error.code == 403


def test_edge_addresses():
    assert ws_url("http://h:8000") == "ws://h:8000/ws/stock/prices"
    assert ws_url("https://h/") == "wss://h/ws/stock/prices"
    assert ws_url("ws://h:1/ws") == "ws://h:1/ws"
    with pytest.raises(ValueError):
        ws_url("h:8000")


def test_the_sdk_imports_only_schemas_and_aiohttp():
    """An app installs the client without the server: nothing from streams, agents, edge or the CLI."""
    code = ("import sys, tickwave.client; "
            "print(sorted({m.split('.')[0] for m in sys.modules}"
            " & {'streams', 'agents', 'edge', 'faust', 'redis', 'asyncpg', 'click', 'pyarrow'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


async def test_the_documented_example_runs(redis_url, redis, keys):
    """docs/client.md's example, as written, against a real edge."""
    block = re.search(r"```python\n(.*?)```", (REPO / "docs" / "client.md").read_text(), re.S)
    assert block, "docs/client.md has no python example"
    log = EventLog(redis, keys)
    await log.append_events(S, price_changes(3))
    async with running_edge(edge_settings(redis_url, keys)) as base:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", block.group(1), env={"TICKWAVE_URL": base, "PATH": "/usr/bin:/bin"},
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            lines: list[str] = []
            ids: list[str] = []
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if not ids and any("snapshot" in line for line in lines):
                    ids = await log.append_events(S, price_changes(3, start=3))
                if ids and all(any(i in line for line in lines) for i in ids):
                    break
                try:
                    raw = await asyncio.wait_for(proc.stdout.readline(), 0.5)  # type: ignore[union-attr]
                except asyncio.TimeoutError:
                    continue
                if not raw:
                    break
                lines.append(raw.decode())
            assert ids and all(any(i in line for line in lines) for i in ids), "".join(lines)
        finally:
            proc.terminate()
            await proc.wait()


async def test_a_market_subscription_yields_typed_breadth_and_resumes_across_a_cut(redis_url, redis, keys):
    """The `market` subscription: the latest breadth as the snapshot, then one BreadthEvent per
    computation, resumed after a cut connection with no gap and no duplicate."""
    log = EventLog(redis, keys)
    first = [await append_breadth(log, n) for n in range(1, 4)]
    async with running_edge(edge_settings(redis_url, keys)) as base:
        proxy = await TcpProxy(int(base.rsplit(":", 1)[1])).start()
        got = Collector(subscribe(proxy.url, "market", subscription_type="market", backoff=FAST, heartbeat=2.0))
        try:
            await wait_until(lambda: got.has(Snapshot), 10, "no snapshot")
            snap = got.of(Snapshot)[0]
            assert snap.event_id == first[-1] and snap.rows == ()
            assert {r.board: r.advancers for r in snap.breadth} == {r.board: r.advancers for r in breadth(3).rows}
            live = [await append_breadth(log, n) for n in range(4, 7)]
            await wait_until(lambda: got.has(BreadthEvent, 3), 10, "live breadth did not arrive")
            assert proxy.cut() == 1
            down = [await append_breadth(log, n) for n in range(7, 12)]
            await wait_until(lambda: got.has(BreadthEvent, 8), 10, "no resume after the cut")
            await got.stop()
            events = got.of(BreadthEvent)
            assert [e.event_id for e in events] == live + down, "a gap or a duplicate across the cut"
            assert [e.rows[0].advancers for e in events] == [breadth(n).rows[0].advancers for n in range(4, 12)]
            resumed = got.of(Resumed)
            assert len(resumed) == 1 and resumed[0].after_id == live[-1] and resumed[0].replayed == len(down)
        finally:
            got.sub.close()
            await proxy.close()
