"""The stock universe as data: the built-in whole market, files in and out, bad files, picks."""

from collections import Counter
from datetime import date

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.market import Board, is_st
from schemas.universe import (
    DEMO_CODES,
    BadUniverseFile,
    Listing,
    Universe,
    UniverseTooSmall,
    default_universe,
    load_universe,
    save_universe,
)

HEADER = "ts_code,name,board,pre_close,st,list_date\n"


@pytest.fixture(scope="module")
def market() -> Universe:
    return default_universe()


def test_the_default_covers_every_code_range_of_every_board(market):
    ranges = Counter()
    for x in market:
        digits = x.ts_code[:6]
        prefix = digits[:3] if digits.startswith(("00", "30", "60", "68", "92")) else digits[0] + "xxxxx"
        ranges[(x.board, prefix if not digits.startswith("43") else "43xxxx")] += 1
    assert ranges == {
        (Board.MAIN, "600"): 778, (Board.MAIN, "601"): 222, (Board.MAIN, "603"): 571, (Board.MAIN, "605"): 128,
        (Board.MAIN, "000"): 432, (Board.MAIN, "001"): 97, (Board.MAIN, "002"): 942, (Board.MAIN, "003"): 42,
        (Board.CHINEXT, "300"): 951, (Board.CHINEXT, "301"): 392,
        (Board.STAR, "688"): 576, (Board.STAR, "689"): 1,
        (Board.BEIJING, "8xxxxx"): 211, (Board.BEIJING, "43xxxx"): 16, (Board.BEIJING, "920"): 41,
    }
    assert len(market) == 5400
    assert market.board_counts() == {Board.MAIN: 3212, Board.CHINEXT: 1343, Board.STAR: 577, Board.BEIJING: 268}


def test_the_default_has_the_snapshots_share_of_st_names_flagged_from_their_names(market):
    st = [x for x in market if x.st]
    assert len(st) == 120 and round(len(st) / len(market) * 100, 1) == 2.2
    assert {x.name.startswith("*ST") for x in st} == {True, False}  # both ST and *ST
    assert all(x.st == is_st(x.name) for x in market)
    assert {x.board for x in st} >= {Board.MAIN, Board.CHINEXT}


def test_the_default_prices_every_listing_and_dates_all_but_one(market):
    assert all(x.pre_close is not None and 1.0 <= x.pre_close <= 1500 for x in market)
    assert [x.ts_code for x in market if x.list_date is None] == ["920002.BJ"]


def test_the_default_has_a_recent_listing_on_every_board(market):
    recent = {x.ts_code: x.list_date for x in market if x.list_date and x.list_date >= date(2026, 11, 23)}
    assert recent == {"605614.SH": date(2026, 11, 27), "001393.SZ": date(2026, 11, 26),
                      "301579.SZ": date(2026, 11, 25), "688815.SH": date(2026, 11, 24),
                      "920042.BJ": date(2026, 11, 27)}


def test_a_small_pick_is_the_well_known_names_across_every_board(market):
    twenty = market.pick(20)
    assert [x.ts_code for x in twenty] == list(DEMO_CODES)
    assert {x.board for x in twenty} == set(Board) and sum(x.st for x in twenty) == 2
    assert market.pick(3) == twenty[:3]


def test_a_large_pick_spreads_over_the_whole_market(market):
    picked = market.pick(5000)
    assert len({x.ts_code for x in picked}) == 5000
    share = Counter(x.board for x in picked)
    for board, n in market.board_counts().items():
        assert abs(share[board] / 5000 - n / len(market)) < 0.01, board
    assert market.pick(5000) == picked  # the same every time
    assert len(market.pick(len(market))) == len(market)


def test_a_pick_larger_than_the_universe_is_refused_by_name(market):
    with pytest.raises(UniverseTooSmall, match="5400"):
        market.pick(5401)
    with pytest.raises(ValueError):
        market.pick(0)


def test_a_pick_skips_listings_without_a_previous_close():
    u = Universe([Listing.of("600000.SH", "浦发银行", 10.0), Listing.of("600004.SH", "白云机场")])
    assert [x.ts_code for x in u.pick(1)] == ["600000.SH"]
    with pytest.raises(UniverseTooSmall):
        u.pick(2)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_universe_survives_a_save_and_load(market, tmp_path, suffix):
    odd = Universe([*market.pick(30), Listing.of("920099.BJ", "新股", None, list_date=None),
                    Listing.of("600000.SH", "浦发银行", 10.125, st=True, list_date=date(1999, 11, 10))])
    for u in (market, odd):
        path = save_universe(u, tmp_path / f"u{suffix}")
        assert load_universe(path) == u


def test_the_shipped_file_is_what_save_writes(market, tmp_path):
    from schemas.universe import DEFAULT_FILE

    save_universe(market, tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_bytes() == DEFAULT_FILE.read_bytes()


def test_a_minimal_file_takes_board_and_st_from_code_and_name(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text("ts_code,name\n300750,宁德时代\nsh600289,*ST信通\n", encoding="utf-8")
    u = load_universe(path)
    ningde, xintong = u.get("300750.SZ"), u.get("600289.SH")
    assert ningde.board is Board.CHINEXT and not ningde.st and ningde.pre_close is None
    assert xintong.board is Board.MAIN and xintong.st and xintong.list_date is None


def test_tushare_style_dates_and_words_for_st_are_read(tmp_path):
    path = tmp_path / "u.csv"
    path.write_text(HEADER + "600000.SH,浦发银行,,10.5,yes,19991110\n", encoding="utf-8-sig")
    (x,) = load_universe(path)
    assert (x.st, x.list_date, x.pre_close) == (True, date(1999, 11, 10), 10.5)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("ts_code,board\n600000.SH,main\n", "missing column(s) name"),
        (HEADER + "600000.SH,浦发银行,main,10,0,1999-11-10\n123456.SH,某某,main,10,0,\n", "line 3: no A-share exchange lists code '123456'"),
        (HEADER + "600000.SH,浦发银行,,10,0,\nsh600000,浦发,,9,0,\n", "line 3: 600000.SH already on line 2"),
        (HEADER + "600000.SH,浦发银行,,10,0,1999-13-40\n", "line 2: "),
        (HEADER + "600000.SH,浦发银行,,-1,0,\n", "line 2: 600000.SH: pre_close must be positive"),
        (HEADER + "600000.SH,浦发银行,,ten,0,\n", "line 2: could not convert"),
        (HEADER + "600000.SH,浦发银行,star,10,0,\n", "line 2: board 'star' disagrees"),
        (HEADER + "600000.SH,浦发银行,,10,maybe,\n", "line 2: st must be"),
        (HEADER, "no listings"),
        ("", "missing column(s) ts_code, name"),
    ],
    ids=["missing-column", "bad-code", "duplicate", "bad-date", "negative-price", "text-price", "wrong-board",
         "bad-st", "header-only", "empty"],
)
def test_a_bad_csv_is_refused_with_the_file_the_line_and_the_reason(tmp_path, body, message):
    path = tmp_path / "bad.csv"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(BadUniverseFile) as info:
        load_universe(path)
    assert str(info.value).startswith(str(path)) and message in str(info.value)


def test_unreadable_files_are_refused_by_name(tmp_path):
    with pytest.raises(BadUniverseFile, match="no such file"):
        load_universe(tmp_path / "missing.csv")
    (tmp_path / "gbk.csv").write_bytes("ts_code,name\n600519.SH,贵州茅台\n".encode("gbk"))
    with pytest.raises(BadUniverseFile, match="not a UTF-8 CSV"):
        load_universe(tmp_path / "gbk.csv")
    (tmp_path / "fake.parquet").write_text("ts_code,name\n")
    with pytest.raises(BadUniverseFile, match="not a Parquet file"):
        load_universe(tmp_path / "fake.parquet")
    with pytest.raises(BadUniverseFile, match="cannot be read"):
        load_universe(tmp_path)


def test_a_bad_parquet_row_is_refused_with_its_row(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"ts_code": ["600000.SH", "600000.XX"], "name": ["浦发银行", "?"]}), path)
    with pytest.raises(BadUniverseFile, match=r"line 3: '600000.XX'"):
        load_universe(path)
