"""The README's run command: the whole pipeline, events produced by the join worker."""

import asyncio
import os
import re
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
