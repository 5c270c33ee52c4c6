"""A-share rules: code parsing, boards, limit bands and percentages (pure, no servers)."""

from datetime import date

import pytest

from schemas.calendar import is_trading_day, trading_day_number
from schemas.market import (
    NO_LIMIT,
    Board,
    InvalidCode,
    board_of,
    change_since_signal,
    limit_band,
    parse_ts_code,
    percent_change,
)

BEFORE_ST_CHANGE = date(2026, 7, 3)
AFTER_ST_CHANGE = date(2026, 7, 6)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("600519.SH", "600519.SH"),
        ("000001.SZ", "000001.SZ"),
        ("830799.BJ", "830799.BJ"),
        ("600519", "600519.SH"),  # the old client's bare code
        ("000001", "000001.SZ"),
        ("300750", "300750.SZ"),
        ("688981", "688981.SH"),
        ("830799", "830799.BJ"),
        ("430047", "430047.BJ"),
        ("920002", "920002.BJ"),
        (" sh600519 ", "600519.SH"),
        ("600519.sh", "600519.SH"),
    ],
)
def test_ts_code_forms_normalise(raw, expected):
    assert parse_ts_code(raw) == expected


@pytest.mark.parametrize("raw", ["", "60051", "6005190", "abcdef", "600519.SZ", "100000", "AAPL.US", "600519.HK"])
def test_bad_codes_are_refused_with_a_named_error(raw):
    with pytest.raises(InvalidCode):
        parse_ts_code(raw)


@pytest.mark.parametrize(
    ("code", "board"),
    [
        ("600519.SH", Board.MAIN), ("000001.SZ", Board.MAIN), ("002594.SZ", Board.MAIN),
        ("300750.SZ", Board.CHINEXT), ("301269.SZ", Board.CHINEXT),
        ("688981.SH", Board.STAR), ("689009.SH", Board.STAR),
        ("830799.BJ", Board.BEIJING),
    ],
)
def test_board_of_code(code, board):
    assert board_of(code) is board


@pytest.mark.parametrize(
    ("code", "name", "pre_close", "low", "high"),
    [
        ("600519.SH", "贵州茅台", 1500.00, 1350.00, 1650.00),  # main board 10%
        ("000001.SZ", "平安银行", 11.11, 10.00, 12.22),  # 12.221 -> 12.22, 9.999 -> 10.00
        ("300750.SZ", "宁德时代", 200.05, 160.04, 240.06),  # ChiNext 20%
        ("301269.SZ", "华大九天", 10.01, 8.01, 12.01),  # 8.008 -> 8.01, 12.012 -> 12.01
        ("688981.SH", "中芯国际", 50.03, 40.02, 60.04),  # STAR 20%: 40.024 / 60.036
        ("689009.SH", "九号公司", 45.00, 36.00, 54.00),
        ("830799.BJ", "艾融软件", 20.05, 14.04, 26.07),  # Beijing 30%: 14.035 / 26.065 half-up
    ],
)
def test_limit_band_by_board(code, name, pre_close, low, high):
    band = limit_band(code, name, pre_close, AFTER_ST_CHANGE)
    assert (band.low, band.high) == (low, high)


def test_limit_price_rounds_half_up_to_the_fen():
    # 10.05 * 1.1 = 11.055 exactly in decimal: half-up gives 11.06 (banker's rounding would give 11.06/11.05)
    band = limit_band("600000.SH", "浦发银行", 10.05, AFTER_ST_CHANGE)
    assert band.high == 11.06
    # 10.05 * 0.9 = 9.045 -> 9.05
    assert band.low == 9.05


def test_st_band_is_five_percent_until_2026_07_05():
    band = limit_band("600289.SH", "*ST信通", 3.37, BEFORE_ST_CHANGE)
    assert (band.low, band.high) == (3.20, 3.54)  # 3.2015 / 3.5385
    last_day = limit_band("000004.SZ", "ST国华", 10.00, date(2026, 7, 5))
    assert (last_day.low, last_day.high) == (9.50, 10.50)


def test_st_band_is_ten_percent_from_2026_07_06():
    band = limit_band("600289.SH", "*ST信通", 3.37, AFTER_ST_CHANGE)
    assert (band.low, band.high) == (3.03, 3.71)  # 3.033 / 3.707


def test_st_on_chinext_keeps_the_board_band():
    band = limit_band("300001.SZ", "ST特锐", 10.00, BEFORE_ST_CHANGE)
    assert (band.low, band.high) == (8.00, 12.00)


def test_band_contains_its_limits_and_not_beyond():
    band = limit_band("600519.SH", "贵州茅台", 1500.0, AFTER_ST_CHANGE)
    assert band.contains(1650.0) and band.contains(1350.0)
    assert not band.contains(1650.01) and not band.contains(1349.99)


def test_percent_change_and_change_since_signal():
    assert percent_change(11.0, 10.0) == 10.0
    assert percent_change(9.5, 10.0) == -5.0
    assert percent_change(10.0, 0.0) == 0.0
    assert change_since_signal(10.5, 10.0) == 5.0
    assert change_since_signal(10.5, None) is None


# New listings: no price limit in their first trading days (registration-reform rules).

def _band(code, listed, day, pre_close=20.0, name="新股"):
    return limit_band(code, name, pre_close, day, list_date=listed)


@pytest.mark.parametrize(
    ("code", "seasoned"),
    [("605614.SH", (18.00, 22.00)), ("001393.SZ", (18.00, 22.00)),  # main board, listed after 2023-04-10
     ("301579.SZ", (16.00, 24.00)), ("688815.SH", (16.00, 24.00))],  # ChiNext, STAR
)
def test_main_chinext_and_star_listings_trade_without_a_limit_for_five_trading_days(code, seasoned):
    listed = date(2026, 11, 24)  # Tuesday: days 1-5 are 11-24 .. 11-30, skipping the weekend
    for day in (date(2026, 11, 24), date(2026, 11, 27), date(2026, 11, 30)):
        band = _band(code, listed, day)
        assert band == NO_LIMIT and not band.bounded and band.contains(80.0), day
    sixth = _band(code, listed, date(2026, 12, 1))
    assert (sixth.low, sixth.high) == seasoned


def test_beijing_listings_trade_without_a_limit_on_their_first_day_only():
    listed = date(2026, 11, 27)
    assert _band("920042.BJ", listed, listed) == NO_LIMIT
    second = _band("920042.BJ", listed, date(2026, 11, 30))
    assert (second.low, second.high) == (14.00, 26.00)


def test_the_first_days_are_counted_in_trading_days_skipping_exchange_holidays():
    # listed the Friday before the 2026 Spring Festival closure (02-16 .. 02-23):
    # trading days 2-5 are 02-24 .. 02-27; counting weekdays would end the free days on 02-19
    listed = date(2026, 2, 13)
    assert _band("605614.SH", listed, date(2026, 2, 27)) == NO_LIMIT
    assert _band("605614.SH", listed, date(2026, 3, 2)).bounded
    assert is_trading_day(date(2026, 2, 13)) and not is_trading_day(date(2026, 2, 18))
    assert trading_day_number(listed, date(2026, 2, 24), stop_after=5) == 2


def test_main_board_listings_before_the_2023_reform_had_a_44_percent_first_day_and_then_the_usual_band():
    listed = date(2022, 6, 1)
    first = _band("601999.SH", listed, listed, pre_close=10.00)
    assert (first.low, first.high) == (6.40, 14.40)
    second = _band("601999.SH", listed, date(2022, 6, 2), pre_close=10.00)
    assert (second.low, second.high) == (9.00, 11.00)
    # the reform date itself is under the new rule
    assert _band("601999.SH", date(2023, 4, 10), date(2023, 4, 14)) == NO_LIMIT


def test_a_listing_without_a_date_or_ticked_before_it_lists_has_the_usual_band():
    assert _band("688815.SH", None, date(2026, 11, 24)).bounded
    assert _band("688815.SH", date(2026, 11, 24), date(2026, 11, 23)).bounded


def test_the_universe_st_flag_overrides_the_name():
    band = limit_band("600000.SH", "浦发银行", 10.00, BEFORE_ST_CHANGE, st=True)
    assert (band.low, band.high) == (9.50, 10.50)
    band = limit_band("600289.SH", "ST信通", 10.00, BEFORE_ST_CHANGE, st=False)
    assert (band.low, band.high) == (9.00, 11.00)
