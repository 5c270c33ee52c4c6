"""A-share rules: code parsing, boards, limit bands and percentages (pure, no servers)."""

from datetime import date

import pytest

from schemas.market import (
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
