"""The stock universe as data: every listed A-share with its board, previous close, ST flag
and listing date, read from a CSV or Parquet file or the built-in whole-market default.

A universe file has one row per listing and these columns (only the first two required):

    ts_code    600519.SH (also sh600519 or a bare 600519)
    name       贵州茅台
    board      main | chinext | star | beijing  (empty: from the code; must agree with it)
    pre_close  previous close in yuan            (empty: unknown; the simulator skips it)
    st         1/0, true/false, yes/no            (empty: from the name's ST mark)
    list_date  2001-08-27 or 20010827             (empty: unknown; taken as seasoned)

The default (schemas/data/universe.csv) is the market as the adata wheel knew it plus
synthetic listings since; schemas/data/NOTICE says which rows are which.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from schemas.market import Board, InvalidCode, board_of, is_st, parse_ts_code

COLUMNS = ("ts_code", "name", "board", "pre_close", "st", "list_date")
REQUIRED = ("ts_code", "name")
DEFAULT_FILE = Path(__file__).parent / "data" / "universe.csv"

# Well-known names across every board (two ST), first in every pick, in this order.
DEMO_CODES = (
    "600519.SH", "601318.SH", "600036.SH", "600900.SH", "601012.SH",  # SH main
    "000001.SZ", "000858.SZ", "002594.SZ", "000333.SZ", "002415.SZ",  # SZ main
    "300750.SZ", "300059.SZ", "300760.SZ",  # ChiNext
    "688981.SH", "688111.SH", "688041.SH",  # STAR
    "830799.BJ", "920002.BJ",  # Beijing
    "600289.SH", "000004.SZ",  # ST, main board
)

_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f"}


class BadUniverseFile(ValueError):
    """A universe file that cannot be used; the message names the file and the row."""


class UniverseTooSmall(ValueError):
    """More stocks asked for than the universe has with a previous close."""


@dataclass(frozen=True, slots=True)
class Listing:
    """One listed stock. Build it with `Listing.of` to fill board and ST from code and name."""

    ts_code: str
    name: str
    board: Board
    pre_close: float | None
    st: bool
    list_date: date | None

    @classmethod
    def of(
        cls,
        ts_code: str,
        name: str,
        pre_close: float | None = None,
        *,
        st: bool | None = None,
        list_date: date | None = None,
    ) -> Listing:
        code = parse_ts_code(ts_code)
        if pre_close is not None and not (math.isfinite(pre_close) and pre_close > 0):
            raise ValueError(f"{code}: pre_close must be positive, got {pre_close}")
        return cls(code, name, board_of(code), pre_close, is_st(name) if st is None else st, list_date)


class Universe:
    """Listings by ts_code, in code order; `source` says where they came from."""

    def __init__(self, listings: Iterable[Listing], source: str = "") -> None:
        by_code: dict[str, Listing] = {}
        for listing in listings:
            if listing.ts_code in by_code:
                raise ValueError(f"{listing.ts_code} is listed twice")
            by_code[listing.ts_code] = listing
        self._by_code = dict(sorted(by_code.items()))
        self.source = source

    def __len__(self) -> int:
        return len(self._by_code)

    def __iter__(self) -> Iterator[Listing]:
        return iter(self._by_code.values())

    def __contains__(self, ts_code: object) -> bool:
        return ts_code in self._by_code

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Universe) and self._by_code == other._by_code

    def __repr__(self) -> str:
        return f"Universe({len(self)} listings from {self.source or 'memory'})"

    def get(self, ts_code: str) -> Listing | None:
        return self._by_code.get(ts_code)

    def board_counts(self) -> Counter[Board]:
        return Counter(listing.board for listing in self)

    def pick(self, count: int) -> list[Listing]:
        """`count` listings with a previous close: the demo names first, then an even spread
        over the rest in code order, so any count mixes the boards like the market does."""
        if count < 1:
            raise ValueError("need at least one stock")
        priced = [listing for listing in self if listing.pre_close is not None]
        if count > len(priced):
            raise UniverseTooSmall(
                f"{count} stocks asked for; the universe ({self.source or 'in memory'}) has {len(priced)} "
                "with a previous close")
        demo = [self._by_code[c] for c in DEMO_CODES if c in self._by_code and self._by_code[c].pre_close]
        if count <= len(demo):
            return demo[:count]
        head = {listing.ts_code for listing in demo}
        rest = [listing for listing in priced if listing.ts_code not in head]
        wanted = count - len(demo)
        return demo + [rest[i * len(rest) // wanted] for i in range(wanted)]


def _parse_date(text: str) -> date:
    text = text.strip()
    if len(text) == 8 and text.isdigit():
        return datetime.strptime(text, "%Y%m%d").date()
    return date.fromisoformat(text[:10])


def _parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"st must be 1/0, true/false or yes/no, got {text!r}")


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def listing_from_row(row: Mapping[str, Any]) -> Listing:
    """One Listing from a file's row (text from CSV, typed values from Parquet)."""
    name = "" if _blank(row.get("name")) else str(row["name"]).strip()
    pre_close = None if _blank(row.get("pre_close")) else float(row["pre_close"])
    st_value = row.get("st")
    st = None if _blank(st_value) else st_value if isinstance(st_value, bool) else _parse_bool(str(st_value))
    list_value = row.get("list_date")
    if _blank(list_value):
        list_date = None
    elif isinstance(list_value, datetime):
        list_date = list_value.date()
    elif isinstance(list_value, date):
        list_date = list_value
    else:
        list_date = _parse_date(str(list_value))
    listing = Listing.of(str(row["ts_code"]), name, pre_close, st=st, list_date=list_date)
    board = row.get("board")
    if not _blank(board) and str(board).strip().lower() != listing.board.value:
        raise ValueError(f"board {board!r} disagrees with the code's board {listing.board.value!r}")
    return listing


def _csv_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:  # utf-8-sig: files saved by Excel
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            return columns, [(reader.line_num, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise BadUniverseFile(f"{path}: not a UTF-8 CSV file: {exc}") from None


def _parquet_rows(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    import pyarrow as pa  # imported late: only Parquet files need it
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pa.ArrowException as exc:
        raise BadUniverseFile(f"{path}: not a Parquet file: {exc}") from None
    rows = table.select([c for c in table.column_names if c in COLUMNS]).to_pylist()
    # numbered like a CSV's lines (the header is line 1), so messages read the same
    return table.column_names, [(i + 2, row) for i, row in enumerate(rows)]


def load_universe(path: Path | str) -> Universe:
    """A Universe from a CSV or Parquet file, or BadUniverseFile saying what is wrong and where."""
    path = Path(path)
    try:
        columns, rows = _parquet_rows(path) if path.suffix.lower() in (".parquet", ".pq") else _csv_rows(path)
    except FileNotFoundError:
        raise BadUniverseFile(f"{path}: no such file") from None
    except OSError as exc:
        raise BadUniverseFile(f"{path}: cannot be read: {exc.strerror or exc}") from None
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise BadUniverseFile(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(columns) or 'none'})")
    listings: list[Listing] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        try:
            listing = listing_from_row(row)
        except (InvalidCode, ValueError, TypeError) as exc:
            raise BadUniverseFile(f"{path}, line {line}: {exc}") from None
        if listing.ts_code in seen:
            raise BadUniverseFile(f"{path}, line {line}: {listing.ts_code} already on line {seen[listing.ts_code]}")
        seen[listing.ts_code] = line
        listings.append(listing)
    if not listings:
        raise BadUniverseFile(f"{path}: no listings")
    return Universe(listings, source=str(path))


def _price_text(price: float | None) -> str:
    if price is None:
        return ""
    return f"{price:.2f}" if round(price, 2) == price else repr(price)


def save_universe(universe: Iterable[Listing], path: Path | str) -> Path:
    """Write a universe file: Parquet for .parquet/.pq, otherwise CSV."""
    path = Path(path)
    listings = list(universe)
    if path.suffix.lower() in (".parquet", ".pq"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema([("ts_code", pa.string()), ("name", pa.string()), ("board", pa.string()),
                            ("pre_close", pa.float64()), ("st", pa.bool_()), ("list_date", pa.date32())])
        rows = [{"ts_code": x.ts_code, "name": x.name, "board": x.board.value, "pre_close": x.pre_close,
                 "st": x.st, "list_date": x.list_date} for x in listings]
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
        return path
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COLUMNS)
        for x in listings:
            writer.writerow([x.ts_code, x.name, x.board.value, _price_text(x.pre_close), int(x.st),
                             x.list_date.isoformat() if x.list_date else ""])
    return path


@lru_cache(maxsize=1)
def default_universe() -> Universe:
    """The built-in whole-market universe shipped with tickwave."""
    universe = load_universe(DEFAULT_FILE)
    universe.source = "built-in"
    return universe


def universe_from(path: Path | str | None) -> Universe:
    """The universe in `path`, or the built-in default when no file is named."""
    return load_universe(path) if path else default_universe()
