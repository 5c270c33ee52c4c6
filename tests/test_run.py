"""The README's run command: the whole pipeline, events produced by the join worker."""

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import aiohttp

from schemas.events import PriceChange, SignalChange
from streams.codec import decode_event

from tickwave.servers import free_port


async def test_tickwave_run_joins_ticks_into_events_archives_them_and_serves_the_page(redis_url, pg_url, keys,
                                                                                       redis):
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": pg_url, "TICKWAVE_KEY_PREFIX": keys.prefix}
    proc = subprocess.Popen([sys.executable, "-m", "tickwave", "run", "--duration", "12", "--port", str(port),
                             "--interval", "0.2", "--stocks", "20"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in first
        assert "join worker: pid" in proc.stdout.readline()
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/") as r:
                assert r.status == 200 and "tickwave" in await r.text()
            async with s.ws_connect(f"http://127.0.0.1:{port}/ws/stock/prices") as ws:
                assert (await ws.receive_json())["type"] == "connected"
                # volume_wave exists once the join has written its first event: until then, as the
                # page does, ask again
                deadline = time.monotonic() + 10
                while True:
                    await ws.send_json({"type": "subscribe", "subscription_type": "strategy", "target": "volume_wave"})
                    reply = await ws.receive_json(timeout=5)
                    if reply["type"] == "subscribed":
                        break
                    assert reply["code"] == "unknown_strategy" and time.monotonic() < deadline, reply
                    await asyncio.sleep(0.2)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    ticks, events, archived = map(int, re.search(r"stopped: (\d+) ticks, (\d+) events, (\d+) archived", out).groups())
    assert ticks > 0 and events > 0 and archived > 0
    # the events are the join's: price changes of the demo signals' stocks, from the ticks topic
    stored = [decode_event(eid, f) for eid, f in await redis.xrange(keys.events("volume_wave"))]
    prices = [e for e in stored if isinstance(e, PriceChange)]
    changes = [e for e in stored if isinstance(e, SignalChange)]
    assert len(changes) == 10, "half of the 20 simulated stocks carry a demo signal"
    assert prices and {p.ts_code for p in prices} <= {c.signal.ts_code for c in changes}
    assert all(p.source_partition >= 0 and p.signal_price for p in prices)


def test_tickwave_run_cluster_starts_the_layout_on_a_redis_cluster_produces_events_and_stops_cleanly(
        pg_url, tmp_path):
    port = free_port()
    env = {**os.environ, "DATABASE_URL": pg_url, "TICKWAVE_KEY_PREFIX": "twrc:"}
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "tickwave", "run", "--cluster", "--port", str(port),
                             "--interval", "0.2", "--stocks", "20", "--dir", str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert "on a Redis Cluster (redis+cluster://" in first and f"http://127.0.0.1:{port}/" in first, first
        pids = [int(p) for p in re.findall(r" (\d+)(?:,|;)", proc.stdout.readline())]
        assert len(pids) == 7, "ingest, relay, two workers, archiver, two edge nodes"
        deadline = time.monotonic() + 120
        while True:  # the join's events, counted on the cluster every second: past the 10 demo
            # signals' own events, so price changes of ticks
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "no price event within 120 s"
            if (m := re.match(r"events\s+([\d,]+)", line)) and int(m.group(1).replace(",", "")) > 10:
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    assert re.search(r"stopped: (1[1-9]|[2-9]\d|\d{3,}) events; exit codes relay 0, worker-a 0, worker-b 0, archive 0, "
                     r"edge-a 0, edge-b 0, ingest 0", out), out[-2000:]
    cluster_pids = [int(line.split()[0]) for line in (tmp_path / "redis" / "pids").read_text().splitlines()]
    for pid in pids + cluster_pids:
        assert not _alive(pid), f"process {pid} outlived the run"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone too
        return f.read().split(") ", 1)[1][0] != "Z"
