"""Conflation of a slow client's queue, as pure logic (the socket side is in test_edge_limits)."""

from __future__ import annotations

import orjson

from edge.conn import Outgoing, conflate
from edge.frames import price_update
from schemas.messages import Pong, price_row
from tests.factories import price_change


def row(code: str, price: float, n: int) -> dict:
    pc = price_change(ts_code=code, price=price, offset=n, pre_close=price)
    return price_row(f"1-{n}", pc.model_dump(mode="json"))


def prices(target: str, rows: list[dict], ingest_ms: float | None = None, epoch: str = "ep") -> Outgoing:
    return Outgoing(price_update(target, epoch, rows), "price_update", ingest_ms, (target, epoch, rows))


def control(n: int) -> Outgoing:
    return Outgoing(Pong(id=n).model_dump_json(), "pong")


def test_price_updates_collapse_to_the_latest_row_per_stock_after_the_control_frames():
    queue = [
        prices("volume_wave", [row("600519.SH", 1500, 1), row("000001.SZ", 11, 2)], ingest_ms=100.0),
        control(1),
        prices("volume_wave", [row("600519.SH", 1501, 3)], ingest_ms=200.0),
        control(2),
        prices("volume_wave", [row("300750.SZ", 200, 4), row("600519.SH", 1502, 5)], ingest_ms=300.0),
    ]
    out = list(conflate(queue))
    assert [o.kind for o in out] == ["pong", "pong", "price_update"]
    assert [orjson.loads(o.text)["id"] for o in out[:2]] == [1, 2]
    frame = orjson.loads(out[2].text)
    # one row per stock, the latest of each, ordered by when each stock last changed
    assert [(r["ts_code"], r["event_id"]) for r in frame["data"]] == [
        ("000001.SZ", "1-2"), ("300750.SZ", "1-4"), ("600519.SH", "1-5")]
    assert frame["count"] == 3 and frame["event_id"] == "1-5" and frame["epoch"] == "ep"
    assert out[2].ingest_ms == 100.0  # the oldest waiting tick sets the latency it reports
    assert out[2].prices is not None and out[2].prices[2] == frame["data"]  # can be conflated again


def test_each_target_is_conflated_on_its_own():
    queue = [prices("a", [row("600519.SH", 1, 1)]), prices("b", [row("600519.SH", 2, 2)]),
             prices("a", [row("600519.SH", 3, 3)])]
    frames = {f["target"]: f for f in (orjson.loads(o.text) for o in conflate(queue))}
    assert {t: [r["event_id"] for r in f["data"]] for t, f in frames.items()} == {"a": ["1-3"], "b": ["1-2"]}


def test_replays_are_never_conflated_and_keep_their_place():
    replay = prices("volume_wave", [row("600519.SH", 1, 1), row("600519.SH", 2, 2)])
    replay.kind = "replay"
    queue = [replay, prices("volume_wave", [row("600519.SH", 3, 3)])]
    out = list(conflate(queue))
    assert out[0] is replay
    assert [r["event_id"] for r in orjson.loads(out[1].text)["data"]] == ["1-3"]


def test_a_queue_without_prices_is_unchanged():
    queue = [control(1), control(2)]
    assert list(conflate(queue)) == queue
