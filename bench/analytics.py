"""bench/analytics: the K-line agent on the whole market (5,000 stocks) at 2,000 ticks/s.

Two phases on fresh key prefixes, the same tick tape and pacing (a batch every 10 ms), each
with one real `tickwave worker` (the join's 500 signalled stocks applied, as bench.pipeline),
one `tickwave edge` and --subscribers WebSocket clients, each subscribed to the 1-minute bars
of one stock (`subscription_type: kline`):
  K-line   the worker runs the join and the K-line agent (the default);
  baseline the worker runs the join alone (TICKWAVE_KLINE_ENABLED=0), and the bench closes
           and appends the same bars itself, with the agent's own code without faust
           (agents.analytics.Klines on the batches it writes, streams.klines.BarLog).

(a) worker CPU: its CPU seconds from the first tick until it has committed every tick (both
    agents took them all) over the seconds the ticks were fed, as % of one core: the share of
    a core it needs to keep up, counted whether or not the busy machine gave it that share.
    K-line against the join alone.
(b) bar close -> `kline_update` frame at a subscriber, p99 over every closed bar of every
    subscribed stock: K-line against the bars the bench appended itself (the edge path alone).

The tick clock: ticks are stamped with a simulated clock of a trading day (from 10:00 Beijing
time, the exchange's session clock) running --speed times faster than the wall clock, so a
minute closes every 60/speed s (5 s at the default 12) instead of once a minute. What stays as
in a real session: the tick rate (2,000/s), the market (every stock ticks in every minute, so
5,000 bars close at each minute's end at once: the burst that sets the latency) and the work
per tick. What is harsher: minutes close `speed` times as often, so the bars' share of the
worker's CPU is overstated, not understated.

"The minute's close" of a bar is the moment it can close: the first tick written to its ticks
partition stamped at or past the bar's end plus the grace (TICKWAVE_KLINE_GRACE_MS, 500 ms of
tick time: a deliberate wait for stragglers, not processing), or, if earlier, the first tick of
the same stock stamped in a later minute (which closes the bar at once). The bench records the
wall time just before it writes each batch; latency is the frame's arrival minus that.

    python -m bench.analytics [--stocks 5000] [--signalled 500] [--partitions 8] [--rate 2000]
                              [--seconds 40] [--speed 12] [--subscribers 20] [--rounds 1]
                              [--py-spy FILE]

Uses REDIS_URL when set, else an embedded Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from agents.analytics import Klines
from agents.klines import State
from agents.settings import WorkerSettings
from bench._common import CpuMeter, line, redis_url
from bench.edge import raise_fd_limit, start_edge, wait_healthy
from bench.edge import stop as stop_process
from bench.pipeline import Run, commit, paced, pct, quantiles
from bench.pipeline_setup import Market, Tape, TapeTick, Workers, make_market, progress
from schemas.klines import bar_deadline
from schemas.market import SHANGHAI
from streams.klines import BarLog
from streams.partition import partition_for
from tickwave.servers import free_port

SESSION_START = datetime(2026, 11, 24, 10, 0, tzinfo=SHANGHAI)  # a Tuesday, a trading day
SETTLE_S = 1.5  # after the phase's last tick, frames still on their way


class SimTape(Tape):
    """The market's ticks in code order, round after round, stamped with the simulated clock;
    cumulative volume and amount grow per stock. Records the wall time each batch was written at,
    per partition and per subscribed stock (what `closed_at` needs)."""

    def __init__(self, market: Market, partitions: int, speed: float, watched: set[str]):
        super().__init__(market, partitions)
        self.speed, self.watched = speed, watched
        self.volume = [0] * len(self.stocks)
        self.amount = [0.0] * len(self.stocks)
        self.wall0: float | None = None
        self.stamp_ms = 0
        self.by_partition: dict[int, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))
        self.by_code: dict[str, tuple[list[int], list[float]]] = defaultdict(lambda: ([], []))

    def sim_ms(self, wall: float) -> int:
        if self.wall0 is None:
            self.wall0 = wall
        return int(SESSION_START.timestamp() * 1000 + (wall - self.wall0) * 1000 * self.speed)

    def stamp(self) -> str:
        self.stamp_ms = self.sim_ms(time.time())
        return datetime.fromtimestamp(self.stamp_ms / 1000, SHANGHAI).isoformat()

    def traded(self, i: int, n: int, price: float) -> dict[str, float]:
        shares = 100 * (n % 7 + 1)
        self.volume[i] += shares
        self.amount[i] = round(self.amount[i] + shares * price, 2)
        return {"volume": self.volume[i], "amount": self.amount[i]}

    def written(self, ticks: Sequence[TapeTick], wall: float) -> None:
        """The batch just taken is written from `wall` on."""
        for p in {t[0] for t in ticks}:
            stamps, walls = self.by_partition[p]
            stamps.append(self.stamp_ms)
            walls.append(wall)
        for code in {t[2] for t in ticks} & self.watched:
            stamps, walls = self.by_code[code]
            stamps.append(self.stamp_ms)
            walls.append(wall)

    def closed_at(self, code: str, start: datetime, partition: int, grace_ms: int) -> float | None:
        """Wall time at which the bar of `code` starting at `start` could first close (see above)."""
        def first(series: tuple[list[int], list[float]], at_ms: int) -> float | None:
            stamps, walls = series
            i = bisect.bisect_left(stamps, at_ms)
            return walls[i] if i < len(walls) else None

        end_ms = int(bar_deadline(start).timestamp() * 1000)
        found = [w for w in (first(self.by_partition[partition], end_ms + grace_ms),
                             first(self.by_code[code], end_ms)) if w is not None]
        return min(found) if found else None


@dataclass
class Subscribers:
    """One WebSocket client per watched stock, each subscribed to its 1-minute bars."""

    port: int
    codes: list[str]
    frames: dict[str, list[tuple[float, dict[str, Any]]]] = field(default_factory=lambda: defaultdict(list))

    async def __aenter__(self) -> Subscribers:
        self.session = aiohttp.ClientSession()
        self.socks = []
        for code in self.codes:
            ws = await self.session.ws_connect(f"http://127.0.0.1:{self.port}/ws")
            await ws.receive_json(timeout=10)  # connected
            await ws.send_json({"type": "subscribe", "subscription_type": "kline", "target": code})
            while True:
                got = await ws.receive_json(timeout=10)
                if got["type"] == "kline_update" and got.get("snapshot"):
                    break
                if got["type"] == "error":
                    raise RuntimeError(f"kline subscribe of {code} refused: {got}")
            self.socks.append(ws)
        self.tasks = [asyncio.create_task(self.read(code, ws)) for code, ws in zip(self.codes, self.socks)]
        return self

    async def read(self, code: str, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            now = time.time()
            body = orjson.loads(msg.data)
            if body.get("type") == "kline_update":
                self.frames[code].append((now, body))

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        for ws in self.socks:
            await ws.close()
        await self.session.close()


@dataclass
class Phase:
    name: str
    run: Run
    latencies: list[float]  # ms, sorted
    from_end: list[float]  # ms from the bar's nominal end (grace included), sorted
    bars: int  # closed bars received
    owed: int  # closed bars in the watched stocks' streams that closed before the last tick
    duplicated: int
    cpu_s: float = 0.0  # the worker's CPU seconds from the first tick until every tick is committed
    fed_s: float = 0.0
    ticks: int = 0

    @property
    def share(self) -> float:
        """% of one core the worker needs to keep up with the feed."""
        return self.cpu_s / self.fed_s * 100

    @property
    def us_per_tick(self) -> float:
        return self.cpu_s / self.ticks * 1e6

    def summary(self) -> str:
        return (f"{quantiles(self.latencies)}   {self.bars:,} closed bars received of {self.owed:,} owed, "
                f"{self.duplicated} duplicated")


async def phase(url: str, market: Market, args: argparse.Namespace, workdir: Path, kline: bool) -> Phase:
    settings = WorkerSettings()
    # the breadth agent off in both: the K-line work against the join alone
    env = {"TICKWAVE_KLINE_ENABLED": "1" if kline else "0", "TICKWAVE_KLINE_SESSIONS": "exchange",
           "TICKWAVE_WORKER_BREADTH": "false"}
    name = "K-line" if kline else "baseline"
    watched = [market.listings[i * len(market.listings) // args.subscribers].ts_code for i in range(args.subscribers)]
    async with Workers(url, market, args.partitions, 1, workdir, extra_env=env) as target:
        tape = SimTape(market, args.partitions, args.speed, set(watched))
        target.tape = tape  # type: ignore[assignment]  # paced() takes its ticks from it
        port = free_port()
        edge = start_edge(url, target.keys, port, log=workdir / f"edge-{name}.log")
        try:
            await wait_healthy(port, edge)
            bars = BarLog(target.client, target.keys, hold=False)
            states: dict[str, State] = {}

            async def save(_partition: int, code: str, value: State) -> None:
                states[code] = value
            # the baseline's bars: the agent's code run by the bench on what it writes, no faust
            own = Klines(bars, args.partitions, mode="exchange", grace_ms=settings.kline_grace_ms,
                         load=states.get, save=save,
                         stored=lambda: list(states.items()))

            async def write(ticks: Sequence[TapeTick]) -> None:
                tape.written(ticks, time.time())
                await target.write_ticks(ticks)
                if not kline:
                    await own.apply([(p, offset, code.encode(), value) for p, offset, code, value in ticks])

            async with Subscribers(port, watched) as subs:
                progress(f"{name}: {len(watched)} kline subscribers, feeding {args.rate:,.0f} ticks/s for "
                         f"{args.seconds:g} s, a minute every {60 / args.speed:g} s")
                pid = target.procs[0].proc.pid
                spy = start_py_spy(pid, args) if kline and args.py_spy else None
                async with CpuMeter(target.client, {"worker": pid}) as whole:
                    run = await paced(target, args.seconds, args.rate, write, f"{name}: ticks",
                                      {"worker": pid, "edge": edge.pid})
                    await all_committed(target, tape)
                if spy is not None:
                    spy.wait()
                await asyncio.sleep(SETTLE_S)
            got = measure(name, run, subs, tape, args.partitions, settings.kline_grace_ms,
                          await owed(bars, watched, args.partitions, tape, settings.kline_grace_ms))
            got.cpu_s, got.fed_s, got.ticks = whole.used["worker"], args.seconds, tape.made
            return got
        finally:
            stop_process(edge)


async def owed(bars: BarLog, codes: list[str], partitions: int, tape: SimTape, grace_ms: int) -> dict[str, set[str]]:
    """The closed bars (start ISO) in the watched stocks' streams that could close during the run."""
    out = {}
    for code in codes:
        got = await bars.read(bars.stream_key(code, partitions))
        out[code] = {b.start.isoformat() for b in got
                     if tape.closed_at(code, b.start, partition_for(code, partitions), grace_ms) is not None}
    return out


def measure(name: str, run: Run, subs: Subscribers, tape: SimTape, partitions: int, grace_ms: int,
            owed_bars: dict[str, set[str]]) -> Phase:
    latencies, from_end = [], []
    received = duplicated = 0
    for code in subs.codes:
        seen: set[str] = set()
        for arrived, body in subs.frames[code]:
            if body.get("snapshot"):
                continue
            for bar in body["data"]:
                if not bar["closed"]:
                    continue
                if bar["start"] in seen:
                    duplicated += 1
                    continue
                seen.add(bar["start"])
                start = datetime.fromisoformat(bar["start"])
                closed = tape.closed_at(code, start, partition_for(code, partitions), grace_ms)
                if closed is None or tape.wall0 is None:
                    continue
                received += 1
                latencies.append((arrived - closed) * 1000)
                end_sim_ms = bar_deadline(start).timestamp() * 1000
                end_wall = tape.wall0 + (end_sim_ms - SESSION_START.timestamp() * 1000) / 1000 / tape.speed
                from_end.append((arrived - end_wall) * 1000)
    return Phase(name, run, sorted(latencies), sorted(from_end), received, sum(map(len, owed_bars.values())),
                 duplicated)


async def all_committed(target: Workers, tape: SimTape) -> None:
    """Until the worker has committed every tick written: both its agents (the join and, when it
    runs, the K-line agent) have taken them all, so the CPU measured covers all their work."""
    app_id = WorkerSettings().worker_app_id
    key = target.keys.group(app_id, "offsets")
    fields = [f"ticks|{p}" for p in range(len(tape.offsets))]
    deadline = time.monotonic() + 300
    while True:
        target.check()
        got = await target.client.hmget(key, fields)
        if all(int(v or 0) >= want for v, want in zip(got, tape.offsets)):
            return
        if time.monotonic() > deadline:
            raise target.failed(f"ticks not committed after 300 s: {got} of {tape.offsets}")
        await asyncio.sleep(0.05)


def start_py_spy(pid: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """py-spy recording the worker over the feed, collapsed stacks to --py-spy (needs ptrace rights)."""
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "100", "--duration",
                             str(int(args.seconds)), "--format", "raw", "--output", args.py_spy, "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def main(args: argparse.Namespace) -> None:
    raise_fd_limit()
    market = make_market(args.stocks, args.signalled)
    grace = WorkerSettings().kline_grace_ms
    workdir = Path(tempfile.mkdtemp(prefix="tickwave-bench-analytics-"))
    ok = False
    try:
        with redis_url() as url:
            rounds: list[tuple[Phase, Phase]] = []
            for r in range(args.rounds):  # alternating, so the machine's load falls on both alike
                progress(f"round {r + 1} of {args.rounds}")
                rounds.append((await phase(url, market, args, workdir, kline=True),
                               await phase(url, market, args, workdir, kline=False)))
        ok = True
    finally:
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"worker and edge logs kept in {workdir}", file=sys.stderr)
    out = [f"bench/analytics  {time.strftime('%Y-%m-%d %H:%M')}  commit {commit()}  {len(market.listings):,} stocks, "
           f"{args.signalled:,} signalled, {args.partitions} tick partitions, {args.rate:,.0f} ticks/s for "
           f"{args.seconds:g} s per phase, tick clock x{args.speed:g} (a minute every {60 / args.speed:g} s), "
           f"grace {grace} ms of tick time, {args.subscribers} kline subscribers",
           line("(a) worker CPU, join + K-line agent", pooled(rounds, 0).share, "% of one core",
                pooled(rounds, 1).share, "join alone (TICKWAVE_KLINE_ENABLED=0)"),
           line("(b) bar close -> kline frame p99", pct(pooled(rounds, 0).latencies, 0.99), "ms",
                pct(pooled(rounds, 1).latencies, 0.99), "bars appended by the bench")]
    if args.rounds > 1:
        out.append(f"    (all {args.rounds} rounds pooled; each round below)")
    for p in (p for pair in rounds for p in pair):
        out.append(f"    {p.name:<9} {p.summary()}")
        out.append(f"    {'':<9} from the minute's end (grace included): {quantiles(p.from_end)}")
        out.append(f"    {'':<9} worker {p.cpu_s:.1f} CPU s for {p.ticks:,} ticks fed in {p.fed_s:g} s "
                   f"({p.us_per_tick:.0f} µs per tick), counted until every tick was committed")
        out.append(f"    {'':<9} {p.run.counts()}; {p.run.cpu}")
    print("\n".join(out))


def pooled(rounds: list[tuple[Phase, Phase]], which: int) -> Phase:
    """The K-line (0) or baseline (1) phases of every round as one: CPU summed, latencies pooled."""
    phases = [pair[which] for pair in rounds]
    first = phases[0]
    return Phase(first.name, first.run, sorted(x for p in phases for x in p.latencies),
                 sorted(x for p in phases for x in p.from_end), sum(p.bars for p in phases),
                 sum(p.owed for p in phases), sum(p.duplicated for p in phases),
                 sum(p.cpu_s for p in phases), sum(p.fed_s for p in phases), sum(p.ticks for p in phases))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.analytics", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stocks", type=int, default=5000, help="the market: listings of the built-in universe")
    p.add_argument("--signalled", type=int, default=500, help="stocks holding a signal (the join's work)")
    p.add_argument("--partitions", type=int, default=8, help="partitions of the ticks topic")
    p.add_argument("--rate", type=float, default=2000.0, help="ticks/s")
    p.add_argument("--seconds", type=float, default=40.0, help="how long each phase feeds ticks")
    p.add_argument("--speed", type=float, default=12.0, help="tick clock speed-up: a minute every 60/speed s")
    p.add_argument("--subscribers", type=int, default=20, help="kline subscribers, one stock each")
    p.add_argument("--rounds", type=int, default=1, help="K-line and baseline phases run alternately this many times")
    p.add_argument("--py-spy", metavar="FILE", help="record the K-line phase's worker with py-spy (raw stacks) into FILE")
    return p


if __name__ == "__main__":
    asyncio.run(main(parser().parse_args()))
