"""A faust app whose table takes many updates over few keys, run as a worker by the compaction tests:

    DRIVER_BROKER=redis://...?prefix=... python -m tests.driver_table_app worker -l info

`store` reads `writes` (8 partitions): a record sets `latest[key] = value`, or deletes the
key when its value is `del` (a tombstone in the changelog). A message on `probe` is answered
on `probe-reply` with the table as JSON (see driver_harness.probe_table).
"""

from __future__ import annotations

import json
import os

import faust

app = faust.App(
    os.environ.get("DRIVER_APP_ID", "tabletest"),
    broker=os.environ["DRIVER_BROKER"],
    web_enabled=False,
    topic_partitions=8,
    datadir=os.environ.get("DRIVER_DATADIR", "/tmp/tickwave-driver-test"),
    broker_commit_interval=0.5,
)
RAW = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
writes = app.topic("writes", partitions=8, **RAW)
probe = app.topic("probe", partitions=1, **RAW)
probe_reply = app.topic("probe-reply", partitions=1, **RAW)
latest = app.Table("latest", default=str, partitions=8)


@app.agent(writes)
async def store(stream: faust.StreamT) -> None:
    async for event in stream.events():
        key = event.key.decode()
        if event.value == b"del":
            if key in latest:  # faust's pop of a missing key raises, default or not
                del latest[key]
        else:
            latest[key] = event.value.decode()


@app.agent(probe)
async def dump(stream: faust.StreamT) -> None:
    async for _ in stream:
        await probe_reply.send(value=json.dumps(dict(latest.items()), sort_keys=True).encode())


if __name__ == "__main__":
    app.main()
