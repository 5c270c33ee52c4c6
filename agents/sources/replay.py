"""Replay ticks from CSV or Parquet in time order, as fast as possible or at N× real time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from agents.sources import RawTick
from schemas.market import SHANGHAI

COLUMNS = ("ts_code", "name", "time", "price", "pre_close", "open", "high", "low",
           "volume", "amount", "bid1", "ask1")


def _parse_times(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """ISO-8601 text (fractional seconds, an offset or none) as timestamps; no offset means Beijing."""
    try:
        return column.cast(pa.timestamp("us", tz="UTC"))
    except pa.ArrowInvalid:
        pass
    try:  # no offset in any of the text: Beijing wall-clock time
        return pc.assume_timezone(column.cast(pa.timestamp("us")), timezone="Asia/Shanghai")
    except pa.ArrowInvalid:
        pass
    # a mix of both: value by value (a file like this is rare, so slow is fine)
    values = []
    for text in column.to_pylist():
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        values.append(moment if moment.tzinfo else moment.replace(tzinfo=SHANGHAI))
    return pa.chunked_array([pa.array(values, pa.timestamp("us", tz="UTC"))])


def load_table(path: Path) -> pa.Table:
    """The file as an Arrow table sorted by time (stable, so equal times keep file order)."""
    if path.suffix.lower() in (".parquet", ".pq"):
        table = pq.read_table(path)
    else:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={"ts_code": pa.string(), "name": pa.string(), "time": pa.string()}))
    missing = {"ts_code", "time", "price"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    if not pa.types.is_timestamp(table.schema.field("time").type):
        table = table.set_column(table.column_names.index("time"), "time", _parse_times(table["time"]))
    return table.sort_by([("time", "ascending")])


class FileReplay:
    """Batches of raw tick dicts in time order; `speed` 0 is as fast as possible."""

    name = "file"

    def __init__(self, path: Path, *, speed: float = 0.0, batch: int | None = None, source_label: str = "file"):
        self.path = path
        self.speed = speed
        # paced replays move in small steps so the pacing stays smooth
        self.batch = batch or (200 if speed > 0 else 5000)
        self.label = source_label

    def _rows(self, table: pa.Table) -> list[dict[str, Any]]:
        # column-wise in Arrow, not per row in Python: zone, source label, missing names
        cols = [c for c in COLUMNS if c in table.column_names]
        table = table.select(cols)
        t = table["time"]
        if t.type.tz is None:  # naive times in a file are Beijing wall-clock times
            t = pc.assume_timezone(t, timezone="Asia/Shanghai")
        table = table.set_column(cols.index("time"), "time", pc.cast(t, pa.timestamp("us", tz="Asia/Shanghai")))
        if "name" in cols:
            table = table.set_column(cols.index("name"), "name", pc.fill_null(table["name"], ""))
        table = table.append_column("source", pa.array([self.label] * table.num_rows, pa.string()))
        return table.to_pylist()

    async def batches(self) -> AsyncIterator[list[RawTick]]:
        table = await asyncio.to_thread(load_table, self.path)
        loop = asyncio.get_running_loop()
        started_wall = loop.time()
        first_tick: datetime | None = None
        for start in range(0, table.num_rows, self.batch):
            rows = self._rows(table.slice(start, self.batch))
            if self.speed > 0 and rows:
                # pace by the first tick of each batch at speed× real time
                first_tick = first_tick or rows[0]["time"]
                due = (rows[0]["time"] - first_tick).total_seconds() / self.speed
                await asyncio.sleep(max(0.0, started_wall + due - loop.time()))
            yield rows  # type: ignore[misc]
