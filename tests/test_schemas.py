"""Every model round-trips through JSON; the old mobile client's frames parse unchanged."""

import json
from datetime import date, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from schemas.events import PriceChange, Signal, SignalChange, Tick
from schemas.export import ALL_MODELS
from schemas.market import SHANGHAI
from schemas.messages import (
    Connected,
    Error,
    ErrorCode,
    Ping,
    Pong,
    PriceItem,
    SignalItem,
    KlineList,
    KlineUpdate,
    SignalList,
    MarketBreadth,
    MarketRow,
    MarketUpdate,
    breadth_rows,
    signal_row,
    PriceUpdate,
    ProtocolError,
    Subscribe,
    Subscribed,
    SignalUpdate,
    Unsubscribe,
    Unsubscribed,
    parse_client_message,
)

from schemas.klines import Bar, derive  # noqa: E402

NOW = datetime(2026, 11, 24, 10, 30, 3, tzinfo=SHANGHAI)


def make_tick(**over):
    fields = dict(
        ts_code="600519.SH", name="贵州茅台", time=NOW, price=1520.5, pre_close=1500.0, open=1501.0,
        high=1525.0, low=1498.0, volume=1_234_500, amount=1.87e9, bid1=1520.4, ask1=1520.5, source="sim",
    )
    fields.update(over)
    return Tick(**fields)


SIGNAL = Signal(strategy="volume_wave", ts_code="600519.SH", name="贵州茅台", signal_date=date(2026, 11, 20),
                signal_price=1480.0, confidence=0.8, reason="volume breakout")
PRICE = PriceChange.from_tick(make_tick(), SIGNAL, ingest_time=NOW, partition=3, offset=42)

BAR = Bar(ts_code="600519.SH", start=NOW.replace(second=0), end=NOW.replace(second=0, minute=31), open=1520.0,
          high=1525.0, low=1519.0, close=1521.5, volume=12_300, amount=18_702_450.5, count=20, event_id="3-0")
MARKET_ROW = MarketRow.model_validate(breadth_rows("1764300000000-0", {
    "time": "2026-11-24T10:00:03+08:00",
    "rows": [{"board": "all", "advancers": 3, "decliners": 2, "unchanged": 1, "limit_up": 1, "limit_down": 0,
              "mean_change_percent": 0.25, "median_change_percent": 0.1, "amount": 1234.5, "count": 6}]})[0])

SAMPLES = [
    make_tick(),
    SIGNAL,
    SignalChange(action="add", signal=SIGNAL),
    PRICE.model_copy(update={"event_id": "1732415403000-0"}),
    Subscribe(type="subscribe", target="volume_wave", last_event_id="1-0", epoch="abc", id=7),
    Unsubscribe(type="unsubscribe", target="volume_wave"),
    Ping(type="ping"),
    Connected(client_id="c1", heartbeat=60),
    Subscribed(subscription_type="strategy", target="volume_wave", epoch="e", event_id="1-0", recovered=True, replayed=3),
    Unsubscribed(subscription_type="strategy", target="volume_wave"),
    PriceUpdate(data=[PriceItem.from_event(PRICE)], count=1, target="volume_wave", event_id="1-0", epoch="e"),
    SignalUpdate(action="add", data=[SIGNAL], count=1, target="volume_wave", event_id="2-0"),
    Pong(id=3),
    SignalList(strategy="volume_wave", data=[SignalItem.model_validate(signal_row(SIGNAL.model_dump()))], count=1),
    KlineUpdate(target="600519.SH", interval="1m", epoch="e", event_id="3-0", data=[BAR]),
    KlineList(ts_code="600519.SH", interval="5m", covered=True, bars=derive([BAR], "5m")),
    MarketUpdate(event_id="1764300000000-0", epoch="e1", data=[MARKET_ROW]),
    MarketBreadth(event_id="1764300000000-0", data=[MARKET_ROW]),
    Error(error="bad", details={"field": "target"}, code=ErrorCode.BAD_MESSAGE),  # last: tests read SAMPLES[-1]
]


def test_every_model_has_a_sample():
    assert {type(s) for s in SAMPLES} == set(ALL_MODELS)


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: type(s).__name__)
def test_round_trips_through_json(sample):
    again = type(sample).model_validate_json(sample.model_dump_json())
    assert again == sample


def test_models_are_frozen():
    with pytest.raises(ValidationError):
        PRICE.price = 1.0  # type: ignore[misc]


def test_times_are_shown_in_beijing_time():
    tick = make_tick(time=datetime(2026, 11, 24, 2, 30, tzinfo=timezone.utc))
    assert tick.time.utcoffset() == timedelta(hours=8)
    assert tick.time.hour == 10


def test_naive_times_are_refused():
    with pytest.raises(ValidationError):
        make_tick(time=datetime(2026, 11, 24, 10, 30))


def test_price_change_computes_changes_from_the_tick():
    assert PRICE.change == 20.5
    assert PRICE.change_percent == pytest.approx(1.3667, abs=1e-4)
    assert PRICE.change_since_signal_percent == pytest.approx(2.7365, abs=1e-4)
    assert (PRICE.source_partition, PRICE.source_offset) == (3, 42)


def test_tick_accepts_the_bare_code_and_normalises_it():
    assert make_tick(ts_code="000001").ts_code == "000001.SZ"


# --- the old mobile client's exact frames ------------------------------------------------

def test_old_client_subscribe_strategy_frame():
    msg = parse_client_message('{"type": "subscribe", "subscription_type": "strategy", "target": "volume_wave"}')
    assert isinstance(msg, Subscribe)
    assert (msg.subscription_type, msg.target, msg.last_event_id) == ("strategy", "volume_wave", None)


def test_old_client_subscribe_stock_frame_with_bare_code():
    msg = parse_client_message('{"type":"subscribe","subscription_type":"stock","target":"600519"}')
    assert isinstance(msg, Subscribe) and msg.subscription_type == "stock" and msg.target == "600519"


def test_old_client_subscribe_without_type_defaults_to_strategy():
    msg = parse_client_message('{"type":"subscribe","target":"volume_wave"}')
    assert isinstance(msg, Subscribe) and msg.subscription_type == "strategy"


def test_old_client_ping_frame_with_timestamp():
    msg = parse_client_message('{"type":"ping","timestamp":1732415403000}')
    assert isinstance(msg, Ping)


def test_price_update_keeps_the_old_field_names():
    doc = json.loads(SAMPLES[10].model_dump_json())
    assert doc["type"] == "price_update"
    assert {"data", "count"} <= doc.keys()
    assert {"code", "name", "price", "change", "change_percent", "volume", "timestamp"} <= doc["data"][0].keys()
    assert doc["data"][0]["code"] == "600519"


def test_connected_and_error_keep_the_old_field_names():
    assert {"type", "client_id", "message", "timestamp"} <= json.loads(Connected(client_id="x", heartbeat=60).model_dump_json()).keys()
    assert {"type", "error", "details"} <= json.loads(SAMPLES[-1].model_dump_json()).keys()


# --- bad frames get a named error, never an exception escaping -----------------------------

@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", ErrorCode.BAD_JSON),
        ("[1, 2]", ErrorCode.BAD_MESSAGE),
        ('{"type": "dance"}', ErrorCode.UNKNOWN_TYPE),
        ('{"target": "x"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "subscribe"}', ErrorCode.BAD_MESSAGE),
        ('{"type": "subscribe", "target": "x", "subscription_type": "fund"}', ErrorCode.BAD_MESSAGE),
        ('{"type": "subscribe", "target": "x", "last_event_id": "yesterday"}', ErrorCode.BAD_MESSAGE),
        ('{"type": ["subscribe"]}', ErrorCode.BAD_MESSAGE),
        ('{"type": {"a": 1}}', ErrorCode.BAD_MESSAGE),
        ('{"type": 5}', ErrorCode.BAD_MESSAGE),
        ('{"type": "subscribe", "target": "x", "id": {"a": 1}}', ErrorCode.BAD_MESSAGE),
        ('{"type": "subscribe", "target": "x", "last_event_id": 5}', ErrorCode.BAD_MESSAGE),
        ('{"type": "subscribe", "target": "x", "last_event_id": "18446744073709551616-0"}', ErrorCode.BAD_MESSAGE),
        ('{"type": "subscribe", "target": ["x"]}', ErrorCode.BAD_MESSAGE),
        ('{"type": "ping", "id": [1]}', ErrorCode.BAD_MESSAGE),
    ],
)
def test_bad_frames_raise_protocol_errors_with_codes(frame, code):
    with pytest.raises(ProtocolError) as info:
        parse_client_message(frame)
    assert info.value.code == code
    assert info.value.to_message().error


def test_protocol_error_echoes_the_request_id():
    with pytest.raises(ProtocolError) as info:
        parse_client_message('{"type": "subscribe", "id": 9}')
    assert info.value.to_message().id == 9
    assert info.value.details[0]["field"] == "target"


@pytest.mark.parametrize(
    ("frame", "field"),
    [('{"type": ["subscribe"]}', "type"), ('{"type": "subscribe", "target": "x", "id": {"a": 1}}', "id"),
     ('{"type": "subscribe", "target": "x", "last_event_id": 5}', "last_event_id"),
     ('{"type": "subscribe", "target": "x", "last_event_id": "1-18446744073709551616"}', "last_event_id")],
)
def test_a_wrongly_typed_field_is_named_once_in_the_details(frame, field):
    with pytest.raises(ProtocolError) as info:
        parse_client_message(frame)
    assert [d["field"] for d in info.value.details] == [field]
    assert info.value.details[0]["problem"]


def test_the_largest_stream_id_is_accepted():
    top = (1 << 64) - 1
    msg = parse_client_message(f'{{"type": "subscribe", "target": "x", "last_event_id": "{top}-{top}"}}')
    assert isinstance(msg, Subscribe) and msg.last_event_id == f"{top}-{top}"


def test_a_signal_row_is_the_signal_in_the_seed_list_style():
    row = signal_row(SIGNAL.model_dump())
    assert row == {"code": "600519", "ts_code": "600519.SH", "name": "贵州茅台", "side": "buy",
                   "signal_date": date(2026, 11, 20), "signal_price": 1480.0, "confidence": 0.8,
                   "reason": "volume breakout"}
    assert SignalItem.model_validate(row).model_dump() == row
