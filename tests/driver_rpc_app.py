"""A faust app on the Redis Streams driver answering requests, as faust's examples/advanced/rpc.py:

    DRIVER_BROKER=redis://...?prefix=... python -m tests.driver_rpc_app worker -l info
    DRIVER_BROKER=redis://...?prefix=... python -m tests.driver_rpc_app ask 3

`mul` answers each value times 100. The commands run in their own process as a
faust client (no worker, no group): `ask X` prints `ask: <answer>`, `join X Y ...`
prints the answers in order, `map X Y ...` prints them as they arrive. A worker
also asks `mul` itself every second and prints `self-ask: <answer>`, as the
example's timers do (with reply_create_topic, so its reply topic is part of its
first subscription); with DRIVER_SELF_JOIN=n it first joins n values and prints
`self-join: <n> answers`. DRIVER_STREAM_BUFFER sets faust's stream_buffer_maxsize.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import faust
from faust.cli import argument

app = faust.App(
    os.environ.get("DRIVER_APP_ID", "drivertest-rpc"),
    broker=os.environ["DRIVER_BROKER"],
    web_enabled=False,
    topic_partitions=4,
    datadir=os.environ.get("DRIVER_DATADIR", "/tmp/tickwave-driver-test"),
    reply_create_topic=True,
    stream_buffer_maxsize=int(os.environ.get("DRIVER_STREAM_BUFFER", "4096")),
)


@app.agent(app.topic("rpc-mul", value_type=float, partitions=4))
async def mul(stream: faust.StreamT[float]) -> AsyncIterator[float]:
    async for value in stream:
        yield value * 100.0


SELF_JOIN = int(os.environ.get("DRIVER_SELF_JOIN", "0"))
joined = False


@app.timer(1.0)
async def self_ask() -> None:
    global joined
    if app.client_only:
        return
    if SELF_JOIN and not joined:
        joined = True
        print(f"self-join: {len(await mul.join([1.0] * SELF_JOIN))} answers", flush=True)
    print(f"self-ask: {await mul.ask(1.0)}", flush=True)


@app.command(argument("x"))
async def ask(self: faust.cli.AppCommand, x: str) -> None:
    print(f"ask: {await mul.ask(float(x))}", flush=True)


@app.command(argument("xs", nargs=-1))
async def join(self: faust.cli.AppCommand, xs: tuple[str, ...]) -> None:
    print(f"join: {await mul.join([float(x) for x in xs])}", flush=True)


@app.command(argument("xs", nargs=-1))
async def map(self: faust.cli.AppCommand, xs: tuple[str, ...]) -> None:
    print(f"map: {sorted([value async for value in mul.map([float(x) for x in xs])])}", flush=True)


if __name__ == "__main__":
    app.main()
