"""Build the built-in universe, schemas/data/universe.csv, from the adata wheel's code list.

    pip download adata==2.9.5 --no-deps -d /tmp/adata
    python infra/build_universe.py /tmp/adata/adata-2.9.5-py3-none-any.whl

The same wheel and --as-of give the same file, byte for byte. What goes in:

- every A-share in adata's `adata/stock/cache/code.csv` (Apache-2.0) that was still listed
  when the list was made (latest listing 2023-10-19): B shares (200/201/900), rows
  without a listing date and delisted names (退, PT) are left out; names are NFKC-normalised
  with their padding spaces removed, as the exchanges print them today;
- the demo names (schemas.universe.DEMO_CODES) with the names and previous closes below;
- synthetic listings standing in for those since adata's list: Beijing's 920xxx codes and
  the next free codes of the ranges the other boards allocate, with generated names and
  listing dates up to --as-of, the last of each board in the final days before it;
- previous closes: not in adata, so drawn per code (a seeded log-normal per board, lower
  for ST names); plausible levels, not quotes.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import random
import unicodedata
import zipfile
from datetime import date, timedelta
from pathlib import Path

from schemas.calendar import is_trading_day
from schemas.market import Board, board_of, is_st, parse_ts_code
from schemas.universe import DEFAULT_FILE, DEMO_CODES, Listing, Universe, save_universe

ADATA_CODES = "adata/stock/cache/code.csv"

# name and previous close of the demo names (listing dates come from adata when it has them)
DEMO = {
    "600519.SH": ("贵州茅台", 1480.00), "601318.SH": ("中国平安", 52.30), "600036.SH": ("招商银行", 41.85),
    "600900.SH": ("长江电力", 28.64), "601012.SH": ("隆基绿能", 17.92), "000001.SZ": ("平安银行", 11.26),
    "000858.SZ": ("五粮液", 128.40), "002594.SZ": ("比亚迪", 296.50), "000333.SZ": ("美的集团", 76.21),
    "002415.SZ": ("海康威视", 29.87), "300750.SZ": ("宁德时代", 262.00), "300059.SZ": ("东方财富", 23.45),
    "300760.SZ": ("迈瑞医疗", 238.10), "688981.SH": ("中芯国际", 88.66), "688111.SH": ("金山办公", 286.30),
    "688041.SH": ("海光信息", 142.75), "830799.BJ": ("艾融软件", 32.18), "920002.BJ": ("万达轴承", 41.20),
    "600289.SH": ("ST信通", 3.37), "000004.SZ": ("*ST国华", 6.12),
}

# (first code tried, how many, first listing date, exchange suffix): synthetic listings
SYNTHETIC = (
    (605600, 15, date(2023, 11, 1), "SH"),   # SH main
    (1380, 13, date(2023, 11, 1), "SZ"),     # SZ main, 001xxx
    (301560, 20, date(2023, 11, 1), "SZ"),   # ChiNext
    (688800, 15, date(2023, 11, 1), "SH"),   # STAR
    (920003, 40, date(2024, 10, 15), "BJ"),  # Beijing's new code range
)
# days before --as-of on which each board's newest synthetic listing lists
RECENT_OFFSET = {"605": 0, "001": 1, "301": 2, "688": 3, "920": 0}

_HEADS = "华中新海天金东恒瑞泰宏盛博联信达安鼎科普精远创智汇嘉润康凯德正永通"
_TAILS = "源芯能光电微航力锐控诚邦晟拓峰辰纳讯捷益"
_TRADES = ("科技", "股份", "电子", "智能", "新材", "医药", "精密", "能源", "生物", "装备", "环保", "通信")

PRICE_MEDIAN = {Board.MAIN: 11.0, Board.CHINEXT: 22.0, Board.STAR: 35.0, Board.BEIJING: 14.0}


def adata_rows(wheel: Path) -> list[dict[str, str]]:
    with zipfile.ZipFile(wheel) as z:
        text = z.read(ADATA_CODES).decode("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def clean_name(raw: str) -> str:
    return "".join(unicodedata.normalize("NFKC", raw).split())


def still_listed(row: dict[str, str]) -> bool:
    code, name = row["stock_code"], row["short_name"]
    return (bool(row["list_date2"]) and not code.startswith(("200", "201", "900"))
            and "退" not in name and "PT" not in name)


def pre_close(ts_code: str, st: bool) -> float:
    """A plausible previous close, the same for the same code on every run."""
    rng = random.Random(f"pre_close:{ts_code}")
    if st:
        return round(min(30.0, max(1.0, 3.2 * math.exp(rng.gauss(0, 0.45)))), 2)
    return round(min(900.0, max(1.5, PRICE_MEDIAN[board_of(ts_code)] * math.exp(rng.gauss(0, 0.7)))), 2)


def fresh_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = rng.choice(_HEADS) + rng.choice(_TAILS) + rng.choice(_TRADES)
        if name not in taken:
            taken.add(name)
            return name


def trading_days(start: date, end: date) -> list[date]:
    days, day = [], start
    while day <= end:
        if is_trading_day(day):
            days.append(day)
        day += timedelta(days=1)
    return days


def synthetic(as_of: date, taken_codes: set[str], taken_names: set[str]) -> list[Listing]:
    rng = random.Random("tickwave-universe")
    recent = trading_days(as_of - timedelta(days=14), as_of)[::-1]  # newest first
    out = []
    for first, count, since, exchange in SYNTHETIC:
        codes: list[str] = []
        number = first
        while len(codes) < count:
            code = f"{number:06d}.{exchange}"
            if code not in taken_codes:
                codes.append(code)
            number += 1
        newest = recent[RECENT_OFFSET[codes[0][:3]]]
        spread = trading_days(since, newest - timedelta(days=14))
        dates = [spread[i * len(spread) // (count - 1)] for i in range(count - 1)] + [newest]
        for code, listed in zip(codes, dates):
            out.append(Listing.of(code, fresh_name(rng, taken_names), pre_close(code, False), list_date=listed))
    return out


def build(wheel: Path, as_of: date) -> Universe:
    listings: dict[str, Listing] = {}
    for row in adata_rows(wheel):
        if not still_listed(row):
            continue
        name = clean_name(row["short_name"])
        code = parse_ts_code(row["stock_code"])
        listed = date.fromisoformat(row["list_date2"])
        listings[code] = Listing.of(code, name, pre_close(code, is_st(name)), list_date=listed)
    for code in DEMO_CODES:
        name, price = DEMO[code]
        known = listings.get(code)
        listings[code] = Listing.of(code, name, price, list_date=known.list_date if known else None)
    extra = synthetic(as_of, set(listings), {x.name for x in listings.values()})
    return Universe([*listings.values(), *extra], source="built-in")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("wheel", type=Path, help="adata-2.9.5-py3-none-any.whl")
    parser.add_argument("--as-of", type=date.fromisoformat, default=date(2026, 11, 27),
                        help="the newest synthetic listing date (a trading day)")
    parser.add_argument("--out", type=Path, default=DEFAULT_FILE)
    args = parser.parse_args()
    universe = build(args.wheel, args.as_of)
    save_universe(universe, args.out)
    counts = universe.board_counts()
    print(f"wrote {len(universe)} listings to {args.out}: "
          + ", ".join(f"{board.value} {counts[board]}" for board in Board)
          + f", ST {sum(x.st for x in universe)}")


if __name__ == "__main__":
    main()
