"""bench/pipeline: ticks through the faust join into strategy events and on to WebSocket clients,
on a whole-market universe (5,000 stocks) with 500 of them signalled across 3 strategies (one in
five of those by two strategies: 600 signals, so a market-wide round of ticks makes 600 events).

(a) ticks/s through the join: real `tickwave worker` processes, one and then two (a fresh key
    prefix each), N ticks written in one burst once the workers hold their partitions and the
    signals are applied; the rate runs from the first event appended to the last (Redis entry
    times), scaled from events to ticks. Baseline, same run: a plain redis-py loop, XREADGROUP
    COUNT 1000 over the tick partitions, each batch joined by the worker's own
    `Joiner.join_ticks` against the signals in a dict (parse, join, `EventLog.append_events` per
    strategy), then XACK: the same join without faust and the driver; in one process, and in two
    taking half the partitions each (what two processes can gain on this machine).
(b) tick -> event appended at --rate ticks/s (a batch every 10 ms, each tick stamped with the
    time it is written) through one worker: the event's Redis entry time minus its tick time
    (millisecond ids: reads up to 1 ms low). Baseline: the raw loop under the same pacing.
(c) tick -> WebSocket frame at --rate ticks/s: one `tickwave edge`, --clients picows clients in
    --client-procs processes (bench/pipeline_clients.py), each subscribed to one strategy,
    checked against the streams for lost and duplicated events. Baseline, same clients and run:
    the bench appends the same ticks' events to the streams itself (agents.join's functions,
    `EventLog.append_events`): no ticks topic, no worker in the path.

    python -m bench.pipeline [--stocks 5000] [--signalled 500] [--partitions 8] [--ticks 100000]
                             [--rate 2000] [--seconds 10] [--clients 1000] [--client-procs 2]
                             [--only a|b|c ...]

Workers take their settings from the environment as usual (TICKWAVE_WORKER_BATCH,
TICKWAVE_WORKER_BATCH_WINDOW_S, ...). Uses REDIS_URL when set, else an embedded Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import cast

import aiohttp

from agents.settings import WorkerSettings
from bench import pipeline_clients
from bench._common import CpuMeter, line, redis_url
from bench.edge import raise_fd_limit, start_edge, wait_healthy
from bench.edge import stop as stop_process
from bench.pipeline_setup import (
    REPO,
    STRATEGIES,
    RawLoop,
    TapeTick,
    Target,
    Workers,
    encoded,
    make_market,
    progress,
)
from streams.codec import lazy
from streams.events import RawEntry
from tickwave.servers import free_port

EVERY_S = 0.01  # the paced feeds write a batch every 10 ms
SETTLE_S = 2.0  # after a phase's last event is appended, frames still on their way to clients


def pct(ordered: Sequence[float], p: float) -> float:
    """The p-quantile of values already sorted (nearest rank)."""
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else float("nan")


# --- measurements -------------------------------------------------------------------------

@dataclass(frozen=True)
class Appended:
    strategy: str
    id: str
    ms: int  # the entry id's time: when Redis appended it
    tick_ms: float

    @property
    def latency_ms(self) -> float:
        return self.ms - self.tick_ms


async def last_ids(target: Target) -> dict[str, str]:
    out = {}
    for s in STRATEGIES:
        last = cast(list[RawEntry], await target.client.xrevrange(target.keys.events(s), count=1))
        out[s] = last[0][0].decode() if last else "0-0"
    return out


async def appended_after(target: Target, marks: dict[str, str]) -> list[Appended]:
    """The price events appended after `marks`, with their tick times."""
    out = []
    for s in STRATEGIES:
        after = marks[s]
        while True:
            raw = cast(list[RawEntry], await target.client.xrange(target.keys.events(s), min=f"({after}",
                                                                  count=10_000))
            for entry_id, fields in raw:
                stored = lazy(entry_id, fields)
                if stored.is_price:
                    tick_ms = datetime.fromisoformat(stored.doc()["tick_time"]).timestamp() * 1000
                    out.append(Appended(s, stored.id, int(stored.id.split("-")[0]), tick_ms))
            if len(raw) < 10_000:
                break
            after = raw[-1][0].decode()
    return out


@dataclass
class Run:
    """What one timed phase wrote and what came out of it."""

    ticks: int
    expected: int
    events: list[Appended]
    meter: CpuMeter
    extra: int = 0  # stream entries beyond the events owed (duplicates)
    rebalances: int = 0  # rounds the workers' group started during the phase: a pause in the rate

    @property
    def cpu(self) -> str:
        return self.meter.text()

    def us_per_tick(self) -> float:
        """CPU of the joining processes per tick: steadier than a rate on a shared machine."""
        return self.meter.joiners() / self.ticks * 1e6

    def rate(self) -> float:
        """Ticks/s from the first event appended to the last, scaled from events to ticks."""
        times = sorted(e.ms for e in self.events)
        if len(times) < 2:
            return 0.0
        span_s = max(times[-1] - times[0], 1) / 1000
        return self.ticks * (len(times) - 1) / len(times) / span_s

    def latencies(self) -> list[float]:
        return sorted(e.latency_ms for e in self.events)

    def counts(self) -> str:
        dup = f", {self.extra:,} more than owed" if self.extra else ""
        moved = f", {self.rebalances} rebalances during it" if self.rebalances else ""
        return f"{self.ticks:,} ticks, {len(self.events):,} events appended of {self.expected:,} owed{dup}{moved}"


async def finish(target: Target, marks: dict[str, str], base: int, ticks: int, expected: int,
                 meter: CpuMeter, rounds: int) -> Run:
    await asyncio.sleep(0.2)  # a duplicate still in flight would show
    extra = await target.count() - base - expected
    return Run(ticks, expected, await appended_after(target, marks), meter, extra,
               await target.rebalances() - rounds)


async def burst(target: Target, n: int) -> Run:
    """(a): n ticks written as fast as Redis takes them, then wait for every event they owe."""
    ticks = target.tape.take(n)
    expected = target.tape.events_for(ticks)
    batches = encoded(ticks)
    marks, base, rounds = await last_ids(target), await target.count(), await target.rebalances()
    meter = CpuMeter(target.client, target.pids())
    progress(f"{target.label}: writing {n:,} ticks in a burst ({expected:,} events owed)")
    step = max(1, 10_000 // target.partitions)
    async with meter:
        for start in range(0, max(len(b) for b in batches.values()), step):
            await target.ticks.append_many({p: b[start:start + step] for p, b in batches.items() if b[start:start + step]})
        await target.wait_count(base + expected, "joining the burst")
    return await finish(target, marks, base, n, expected, meter, rounds)


Writer = Callable[[Sequence[TapeTick]], Awaitable[None]]


async def paced(target: Target, seconds: float, rate: float, write: Writer, what: str,
                pids: dict[str, int] | None = None) -> Run:
    """(b), (c): `rate` ticks/s for `seconds`, a batch every 10 ms (late batches catch up), each
    tick stamped with the time it is written; then wait for every event they owe."""
    marks, base, rounds = await last_ids(target), await target.count(), await target.rebalances()
    total = int(rate * seconds)
    sent = expected = 0
    meter = CpuMeter(target.client, target.pids() if pids is None else pids)
    async with meter:
        start = next_at = time.monotonic()
        printed = start
        while sent < total:
            due = min(total, int(rate * (time.monotonic() - start)) + 1)
            if due > sent:
                ticks = target.tape.take(due - sent)
                await write(ticks)
                sent, expected = due, expected + target.tape.events_for(ticks)
            if time.monotonic() - printed > 1.0:
                target.check()
                progress(f"{target.label}: {what}, {sent:,}/{total:,} ticks at {rate:,.0f}/s")
                printed = time.monotonic()
            next_at += EVERY_S
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await target.wait_count(base + expected, what)
    return await finish(target, marks, base, total, expected, meter, rounds)


# --- (c) the edge and its clients ----------------------------------------------------------

@dataclass
class Pushed:
    """What the clients saw of one phase's events."""

    run: Run
    got: pipeline_clients.Delivered
    owed: int = 0
    frames: float = 0  # price_update frames the edge sent during the phase (its /metrics)

    def ordered(self) -> list[float]:
        return self.got.ordered()

    def summary(self) -> str:
        g = self.got
        return (f"{quantiles(self.ordered())}   {g.delivered:,} of {self.owed:,} deliveries, "
                f"{g.lost:,} lost, {g.duplicated:,} duplicated")

    def frames_text(self, seconds: float) -> str:
        per_frame = self.got.delivered / self.frames if self.frames else float("nan")
        return f"edge sent {self.frames / seconds:,.0f} price frames/s, {per_frame:.1f} events per frame"


async def frames_sent(port: int) -> float:
    """The edge's count of price_update frames sent, from its /metrics."""
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    for row in text.splitlines():
        if row.startswith('tickwave_edge_messages_sent_total{type="price_update"}'):
            return float(row.split()[-1])
    return 0.0


async def push(url: str, target: Workers, clients: int, procs: int, seconds: float, rate: float) -> list[Pushed]:
    """(c): the join path, then the bench appending the events itself, to the same clients."""
    port = free_port()
    edge = start_edge(url, target.keys, port, log=target.workdir / "edge.log")
    fleet: pipeline_clients.Fleet | None = None
    try:
        await wait_healthy(port, edge)
        strategies = [STRATEGIES[i % len(STRATEGIES)] for i in range(clients)]
        fleet = pipeline_clients.Fleet(f"ws://127.0.0.1:{port}/ws", strategies, procs)
        progress(f"(c): connecting {clients:,} clients in {procs} processes")
        retries = await fleet.ready()
        progress(f"(c): {clients:,} clients subscribed")
        if retries:  # the run goes on: the edge's own reason, as its log says it
            tail = (target.workdir / "edge.log").read_text(errors="replace").splitlines()[-3:]
            progress(f"(c): {retries} subscribes resent after `unavailable`; the edge's log ends:\n"
                     + "\n".join(tail))
        pids = {**target.pids(), "edge": edge.pid, **fleet.pids()}
        runs, frames = [], []
        for name, write in (("through the join", target.write_ticks), ("appended by the bench", target.write_events)):
            before = await frames_sent(port)
            runs.append(await paced(target, seconds, rate, write, f"(c) {name}", pids))
            await asyncio.sleep(SETTLE_S)
            frames.append(await frames_sent(port) - before)
        phases = []
        for run in runs:
            # latency from each event's tick time
            ids: dict[str, dict[str, float]] = defaultdict(dict)
            for e in run.events:
                ids[e.strategy][e.id] = e.tick_ms
            phases.append(dict(ids))
        reports = await fleet.report(phases)
        per_strategy = {s: strategies.count(s) for s in STRATEGIES}
        return [Pushed(run, got, sum(per_strategy[e.strategy] for e in run.events), n)
                for run, got, n in zip(runs, reports, frames)]
    finally:
        if fleet is not None:
            fleet.close()
        stop_process(edge)


# --- the whole run --------------------------------------------------------------------------

def quantiles(values: list[float]) -> str:
    """Of values already sorted."""
    return (f"p50 {pct(values, 0.5):6.1f} ms   p99 {pct(values, 0.99):6.1f} ms   "
            f"max {values[-1] if values else float('nan'):6.1f} ms")


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


async def main(args: argparse.Namespace) -> None:
    raise_fd_limit()
    parts = set(args.only or "abc")
    market = make_market(args.stocks, args.signalled)
    settings = WorkerSettings()
    workdir = Path(tempfile.mkdtemp(prefix="tickwave-bench-pipeline-"))
    out: list[str] = []
    ok = False
    try:
        with redis_url() as url:
            one_burst = raw_burst = two_burst = raw2_burst = None
            two_split = ""
            b_join = b_raw = None
            pushed: list[Pushed] = []
            async with Workers(url, market, args.partitions, 1, workdir) as one:
                if "a" in parts:
                    one_burst = await burst(one, args.ticks)
                if "b" in parts:
                    b_join = await paced(one, args.seconds, args.rate, one.write_ticks, "(b) paced ticks")
                if "c" in parts:
                    pushed = await push(url, one, args.clients, args.client_procs, args.seconds, args.rate)
            if parts & {"a", "b"}:
                async with RawLoop(url, market, args.partitions, 1) as raw:
                    if "a" in parts:
                        raw_burst = await burst(raw, args.ticks)
                    if "b" in parts:
                        b_raw = await paced(raw, args.seconds, args.rate, raw.write_ticks, "(b) paced ticks")
            if "a" in parts:
                async with Workers(url, market, args.partitions, 2, workdir) as two:
                    two_burst = await burst(two, args.ticks)
                    two_split = two.split
                async with RawLoop(url, market, args.partitions, 2) as raw2:
                    raw2_burst = await burst(raw2, args.ticks)
        ok = True
    finally:
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"worker logs kept in {workdir}", file=sys.stderr)

    signals = len(market.changes)
    out.append(f"bench/pipeline  {time.strftime('%Y-%m-%d %H:%M')}  commit {commit()}  "
               f"{len(market.listings):,} stocks, {args.signalled:,} signalled ({signals:,} signals, "
               f"{len(STRATEGIES)} strategies), {args.partitions} tick partitions, worker batch "
               f"{settings.worker_batch} at most, "
               + (f"window {settings.worker_batch_window_s * 1000:g} ms" if settings.worker_batch_window_s
                  else "no window"))
    if one_burst and raw_burst and two_burst and raw2_burst:
        out.append(line("(a) join, one worker", one_burst.rate(), "ticks/s", raw_burst.rate(),
                        "raw XREADGROUP->join->append, one process"))
        out.append(line("(a) join, two workers", two_burst.rate(), "ticks/s", one_burst.rate(), "join, one worker"))
        out.append(line("(a) raw loop, two processes", raw2_burst.rate(), "ticks/s", raw_burst.rate(),
                        "raw loop, one process"))
        out.append(f"    (two workers held {two_split} of the {args.partitions} tick partitions)")
        for name, run in (("one worker", one_burst), ("two workers", two_burst), ("raw loop", raw_burst),
                          ("raw loop x2", raw2_burst)):
            out.append(f"    {name:<12} {run.counts()}, {run.us_per_tick():.0f} µs of join CPU per tick; {run.cpu}")
    if b_join and b_raw:
        join_lat, raw_lat = b_join.latencies(), b_raw.latencies()
        out.append(line(f"(b) tick -> event appended p99, {args.rate:,.0f}/s", pct(join_lat, 0.99), "ms",
                        pct(raw_lat, 0.99), "raw loop"))
        for name, run, lat in (("one worker", b_join, join_lat), ("raw loop", b_raw, raw_lat)):
            out.append(f"    {name:<12} {quantiles(lat)}   {run.counts()}")
            out.append(f"    {'':<12} {run.cpu}")
    if pushed:
        via_join, direct = pushed
        out.append(line(f"(c) tick -> WebSocket frame p99, {args.clients:,} clients",
                        pct(via_join.ordered(), 0.99), "ms",
                        pct(direct.ordered(), 0.99), "events appended by the bench"))
        for name, p in (("join", via_join), ("direct", direct)):
            out.append(f"    {name:<8} {p.summary()}")
            out.append(f"    {'':<8} appended: {quantiles(p.run.latencies())}   {p.run.counts()}")
            out.append(f"    {'':<8} {p.frames_text(args.seconds)}; {p.run.cpu}")
    print("\n".join(out))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stocks", type=int, default=5000, help="the market: listings of the built-in universe")
    p.add_argument("--signalled", type=int, default=500, help="stocks holding a signal")
    p.add_argument("--partitions", type=int, default=8, help="partitions of the ticks (and signals) topic")
    p.add_argument("--ticks", type=int, default=100_000, help="ticks in each of (a)'s bursts")
    p.add_argument("--rate", type=float, default=2000.0, help="ticks/s in (b) and (c)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long (b) and (c) feed each phase")
    p.add_argument("--clients", type=int, default=1000, help="WebSocket clients in (c)")
    p.add_argument("--client-procs", type=int, default=2, help="processes the clients of (c) run in")
    p.add_argument("--only", action="append", choices=["a", "b", "c"],
                   help="run only this part (repeatable); default all three")
    return p


if __name__ == "__main__":
    asyncio.run(main(parser().parse_args()))
