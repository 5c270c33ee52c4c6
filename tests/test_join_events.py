"""Building a strategy's price-change event from a tick and a signal: pure, no Redis."""

from __future__ import annotations

from datetime import date, datetime

import pytest

from schemas.events import PriceChange, Signal, Tick
from schemas.market import SHANGHAI, percent_change
from schemas.messages import PriceItem, price_row

T = datetime(2026, 11, 24, 10, 30, 3, tzinfo=SHANGHAI)


def tick(price: float = 10.5, pre_close: float = 10.0, name: str = "平安银行", volume: int = 123_400) -> Tick:
    return Tick(ts_code="000001.SZ", name=name, time=T, price=price, pre_close=pre_close, volume=volume, source="sim")


def signal(price: float | None = 10.2, name: str = "signal name") -> Signal:
    return Signal(strategy="volume_wave", ts_code="000001.SZ", name=name, signal_date=date(2026, 11, 20),
                  signal_price=price)


def build(t: Tick, s: Signal) -> PriceChange:
    return PriceChange.from_tick(t, s, ingest_time=T, partition=5, offset=77)


def test_changes_are_computed_against_the_previous_close_and_the_signal_price():
    pc = build(tick(10.5, 10.0), signal(10.2))
    assert pc.change == 0.5
    assert pc.change_percent == pytest.approx(5.0)
    assert pc.signal_price == 10.2
    assert pc.change_since_signal_percent == pytest.approx((10.5 - 10.2) / 10.2 * 100, abs=1e-4)
    assert pc.change_percent == percent_change(10.5, 10.0)


def test_the_event_carries_the_strategy_the_stock_and_the_tick_position():
    pc = build(tick(), signal())
    assert (pc.strategy, pc.ts_code, pc.code) == ("volume_wave", "000001.SZ", "000001")
    assert (pc.source_partition, pc.source_offset) == (5, 77)
    assert pc.tick_time == T and pc.volume == 123_400 and pc.event_id is None


def test_a_signal_without_a_price_gives_no_change_since_signal():
    pc = build(tick(), signal(None))
    assert pc.signal_price is None and pc.change_since_signal_percent is None


def test_the_tick_name_wins_and_the_signal_name_fills_a_nameless_tick():
    assert build(tick(name="平安银行"), signal(name="x")).name == "平安银行"
    assert build(tick(name=""), signal(name="平安银行")).name == "平安银行"


def test_a_falling_price_gives_negative_changes():
    pc = build(tick(9.0, 10.0), signal(9.5))
    assert pc.change == -1.0 and pc.change_percent == pytest.approx(-10.0)
    assert pc.change_since_signal_percent == pytest.approx(-5.2632, abs=1e-4)


def test_the_row_the_old_client_sees_is_built_from_the_event_in_one_place():
    pc = build(tick(), signal()).model_copy(update={"event_id": "1-0"})
    row = price_row(pc.event_id, pc.model_dump(mode="json"))
    assert PriceItem.model_validate(row) == PriceItem.from_event(pc)
    assert row["code"] == "000001" and row["event_id"] == "1-0" and row["signal_price"] == 10.2
