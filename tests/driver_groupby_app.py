"""A faust app on the Redis Streams driver whose `group_by` makes a long repartition topic:

    DRIVER_BROKER=redis://...?prefix=... python -m tests.driver_groupby_app worker -l info

faust names it `<agent>-<topic>-<Model>.<field>-repartition`, the agent being
`<module>.<function>` unless named; the agent's name stands in for a module with a
descriptive path, long enough that the topic has DRIVER_TOPIC_LENGTH characters
(200 unless told). `total` sums order amounts per account in the `totals` table
through that topic, and copies each order to DRIVER_AUDIT_TOPIC when set; a
message on `probe` is answered on `probe-reply` with the table as JSON.
"""

from __future__ import annotations

import json
import os

import faust

app = faust.App(
    os.environ.get("DRIVER_APP_ID", "drivertest"),
    broker=os.environ["DRIVER_BROKER"],
    web_enabled=False,
    topic_partitions=4,
    datadir=os.environ.get("DRIVER_DATADIR", "/tmp/tickwave-driver-test"),
    broker_commit_interval=0.5,
)


class Order(faust.Record, serializer="json"):
    account: str
    amount: int


RAW = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
orders = app.topic("orders", key_type=bytes, key_serializer="raw", value_type=Order, partitions=4)
probe = app.topic("probe", partitions=1, **RAW)
probe_reply = app.topic("probe-reply", partitions=1, **RAW)
totals = app.Table("totals", default=int, partitions=4)

TOPIC_LENGTH = int(os.environ.get("DRIVER_TOPIC_LENGTH", "200"))
SUFFIX = "-orders-Order.account-repartition"
AGENT = ("tests.driver_groupby_app." + "a_descriptive_module_path." * 10)[:TOPIC_LENGTH - len(SUFFIX)]
AUDIT = os.environ.get("DRIVER_AUDIT_TOPIC")
audit = app.topic(AUDIT, value_type=Order, partitions=1) if AUDIT else None


@app.agent(orders, name=AGENT)
async def total(stream: faust.StreamT[Order]) -> None:
    async for order in stream.group_by(Order.account):
        totals[order.account] += order.amount
        if audit is not None:
            await audit.send(value=order)


@app.agent(probe)
async def dump(stream: faust.StreamT) -> None:
    async for _ in stream:
        await probe_reply.send(value=json.dumps(dict(totals.items()), sort_keys=True).encode())


if __name__ == "__main__":
    app.main()
