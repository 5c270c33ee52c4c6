"""`tickwave universe fetch`, offline: Tushare Pro's HTTP answers stubbed at the requests layer.

The answers in tests/fixtures/tushare_*.json are written by hand in the API's format
(`{"code": 0, "msg": "", "data": {"fields": [...], "items": [...]}}`); their rows are
illustrative, not a record of any day.
"""

import json
from datetime import date
from pathlib import Path

import pytest
import responses
from click.testing import CliRunner

from agents.stock_basic import API_URL, BASIC_FIELDS, TushareApiError, fetch_universe
from schemas.market import NO_LIMIT, Board, limit_band
from schemas.universe import load_universe
from tickwave.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
STOCK_BASIC = json.loads((FIXTURES / "tushare_stock_basic.json").read_text(encoding="utf-8"))
DAILY = json.loads((FIXTURES / "tushare_daily.json").read_text(encoding="utf-8"))
NO_ROWS = {"request_id": "0", "code": 0, "msg": "", "data": {"fields": ["ts_code", "trade_date", "close"],
                                                             "items": [], "has_more": False}}
REFUSED = {"request_id": "0", "code": 40203, "data": None,
           "msg": "抱歉，您没有接口(stock_basic)访问权限，权限的具体详情访问：https://tushare.pro/document/1?doc_id=108。"}


def tushare(rsps, *, closes_from_call=2):
    """Answer like Tushare: stock_basic's list; daily empty until the `closes_from_call`-th daily call."""
    asked = []

    def answer(request):
        body = json.loads(request.body)
        asked.append(body)
        if body["api_name"] == "stock_basic":
            return 200, {}, json.dumps(STOCK_BASIC)
        daily_calls = sum(b["api_name"] == "daily" for b in asked)
        return 200, {}, json.dumps(DAILY if daily_calls >= closes_from_call else NO_ROWS)

    rsps.add_callback(responses.POST, API_URL, callback=answer, content_type="application/json")
    return asked


def test_stock_basic_and_the_latest_closes_become_a_universe():
    lines = []
    with responses.RequestsMock() as rsps:
        asked = tushare(rsps)
        u = fetch_universe("recorded-token", today=date(2026, 11, 30), progress=lines.append)
    assert asked[0] == {"api_name": "stock_basic", "token": "recorded-token", "params": {"list_status": "L"},
                        "fields": BASIC_FIELDS}
    # Monday's closes are not out yet: back to Friday's
    assert [b["params"]["trade_date"] for b in asked[1:]] == ["20261130", "20261127"]
    assert len(u) == 25
    assert u.board_counts() == {Board.MAIN: 12, Board.CHINEXT: 5, Board.STAR: 5, Board.BEIJING: 3}
    assert {x.ts_code for x in u if x.st} == {"000004.SZ", "600289.SH", "300108.SZ"}
    moutai = u.get("600519.SH")
    assert (moutai.name, moutai.pre_close, moutai.list_date) == ("贵州茅台", 1495.5, date(2001, 8, 27))
    # suspended, and listing today: no close to carry
    assert {x.ts_code for x in u if x.pre_close is None} == {"000004.SZ", "920042.BJ"}
    assert lines[0] == "stock_basic: 25 listed stocks"
    assert "daily 2026-11-27: 23 closes" in lines
    assert any(line.startswith("2 without a close") for line in lines)


def test_the_fetched_listing_dates_free_the_new_listings_first_days():
    with responses.RequestsMock() as rsps:
        tushare(rsps)
        u = fetch_universe("t", today=date(2026, 11, 30))
    star = u.get("688815.SH")  # listed 11-24: Monday 11-30 is its fifth trading day
    assert limit_band(star.ts_code, star.name, star.pre_close, date(2026, 11, 30), list_date=star.list_date) == NO_LIMIT
    assert limit_band(star.ts_code, star.name, star.pre_close, date(2026, 12, 1), list_date=star.list_date).bounded


def test_without_prices_only_stock_basic_is_called():
    with responses.RequestsMock() as rsps:
        asked = tushare(rsps)
        u = fetch_universe("t", today=date(2026, 11, 30), prices=False)
    assert [b["api_name"] for b in asked] == ["stock_basic"]
    assert all(x.pre_close is None for x in u)


def test_a_refusal_carries_tushares_reason():
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, API_URL, json=REFUSED)
        with pytest.raises(TushareApiError, match=r"stock_basic: Tushare refused \(code 40203\): 抱歉"):
            fetch_universe("t", today=date(2026, 11, 30))


def test_the_command_writes_the_file_with_progress(tmp_path):
    out = tmp_path / "universe.parquet"
    with responses.RequestsMock() as rsps:
        tushare(rsps)
        result = CliRunner().invoke(main, ["universe", "fetch", "--out", str(out)],
                                    env={"TICKWAVE_TUSHARE_TOKEN": "recorded-token"})
    assert result.exit_code == 0, result.output
    assert "stock_basic: 25 listed stocks" in result.stderr
    assert f"wrote 25 listings to {out}" in result.stderr and f"TICKWAVE_UNIVERSE_FILE={out}" in result.stderr
    written = load_universe(out)
    assert len(written) == 25 and written.get("300750.SZ").pre_close == 265.4


def test_the_command_without_a_token_says_so_and_calls_nothing(tmp_path):
    with responses.RequestsMock() as rsps:  # any request would fail the test
        result = CliRunner().invoke(main, ["universe", "fetch", "--out", str(tmp_path / "u.csv")],
                                    env={"TICKWAVE_TUSHARE_TOKEN": ""})
        assert not rsps.calls
    assert result.exit_code == 2
    assert "TICKWAVE_TUSHARE_TOKEN is not set" in result.output
    assert not (tmp_path / "u.csv").exists()


def test_the_command_reports_a_refusal_without_a_traceback(tmp_path):
    with responses.RequestsMock() as rsps:
        rsps.add(responses.POST, API_URL, json=REFUSED)
        result = CliRunner().invoke(main, ["universe", "fetch", "--out", str(tmp_path / "u.csv")],
                                    env={"TICKWAVE_TUSHARE_TOKEN": "t"})
    assert result.exit_code == 1
    assert "Tushare refused (code 40203)" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "u.csv").exists()


def test_show_checks_a_file_and_counts_its_boards(tmp_path):
    result = CliRunner().invoke(main, ["universe", "show"], env={"TICKWAVE_UNIVERSE_FILE": ""})
    assert result.exit_code == 0, result.output
    assert "built-in: 5400 listings (main 3212, chinext 1343, star 577, beijing 268; ST 120" in result.output
    bad = tmp_path / "bad.csv"
    bad.write_text("ts_code\n600000.SH\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["universe", "show", str(bad)])
    assert result.exit_code == 2 and "missing column(s) name" in result.output
