"""The faust app bench/driver measures: one agent that forwards `bench-in` to `bench-out`.

    BENCH_BROKER=redis://...?prefix=... python -m bench.driver_app worker --without-web
"""

from __future__ import annotations

import os

import faust

app = faust.App(
    "benchdriver",
    broker=os.environ["BENCH_BROKER"],
    web_enabled=False,
    topic_partitions=int(os.environ.get("BENCH_PARTITIONS", "4")),
    datadir=os.environ.get("BENCH_DATADIR", "/tmp/tickwave-bench-driver"),
)
RAW = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
source = app.topic("bench-in", **RAW)
sink = app.topic("bench-out", **RAW)


@app.agent(source)
async def forward(stream: faust.StreamT) -> None:
    async for key, value in stream.items():
        await sink.send(key=key, value=value)


if __name__ == "__main__":
    app.main()
