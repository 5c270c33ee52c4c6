"""A faust app on the Redis Streams driver, run as a worker process by the driver tests:

    DRIVER_BROKER=redis://...?prefix=... python -m tests.driver_app worker -l info

`relay` reads `src` (8 partitions), counts each key in the `counts` table and
sends the record on to `dst` with the same key and value, and a `by` header
naming the process (its pid) that processed it; a record whose value is
`stall:<pid>:<seconds>` makes that process's agent sleep so long on it (a
busy agent), and is not relayed. A message on
`probe` is answered on `probe-reply` with the table's contents as JSON, so a
test can read the table from outside the worker.
"""

from __future__ import annotations

import asyncio
import json
import os

import faust

app = faust.App(
    os.environ.get("DRIVER_APP_ID", "drivertest"),
    broker=os.environ["DRIVER_BROKER"],
    web_enabled=False,
    topic_partitions=8,
    datadir=os.environ.get("DRIVER_DATADIR", "/tmp/tickwave-driver-test"),
    broker_commit_interval=float(os.environ.get("DRIVER_COMMIT_INTERVAL", "0.5")),
    consumer_auto_offset_reset=os.environ.get("DRIVER_OFFSET_RESET", "earliest"),
)
RAW = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
src = app.topic("src", partitions=8, **RAW)
dst = app.topic("dst", partitions=8, **RAW)
probe = app.topic("probe", partitions=1, **RAW)
probe_reply = app.topic("probe-reply", partitions=1, **RAW)
counts = app.Table("counts", default=int, partitions=8)
DELAY = float(os.environ.get("DRIVER_DELAY", "0"))
BY = {"by": str(os.getpid()).encode()}


@app.agent(src)
async def relay(stream: faust.StreamT) -> None:
    async for event in stream.events():
        if event.value.startswith(b"stall:"):
            _, pid, seconds = event.value.decode().split(":")
            if int(pid) == os.getpid():
                print(f"stalling pid={pid} for {seconds}s", flush=True)
                await asyncio.sleep(float(seconds))
            continue
        if DELAY:
            await asyncio.sleep(DELAY)
        counts[event.key.decode()] += 1
        await dst.send(key=event.key, value=event.value, headers=BY)


@app.agent(probe)
async def dump(stream: faust.StreamT) -> None:
    async for _ in stream:
        await probe_reply.send(value=json.dumps(dict(counts.items()), sort_keys=True).encode())


if __name__ == "__main__":
    app.main()
