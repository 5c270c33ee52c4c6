"""A small universe of real A-share stocks across every board, for demos, the simulator and tests.

Previous closes are plausible levels, not quotes of any particular day.
"""

from __future__ import annotations

from typing import NamedTuple


class Listing(NamedTuple):
    ts_code: str
    name: str
    pre_close: float


UNIVERSE: tuple[Listing, ...] = (
    Listing("600519.SH", "贵州茅台", 1480.00),   # SH main
    Listing("601318.SH", "中国平安", 52.30),
    Listing("600036.SH", "招商银行", 41.85),
    Listing("600900.SH", "长江电力", 28.64),
    Listing("601012.SH", "隆基绿能", 17.92),
    Listing("000001.SZ", "平安银行", 11.26),     # SZ main
    Listing("000858.SZ", "五粮液", 128.40),
    Listing("002594.SZ", "比亚迪", 296.50),
    Listing("000333.SZ", "美的集团", 76.21),
    Listing("002415.SZ", "海康威视", 29.87),
    Listing("300750.SZ", "宁德时代", 262.00),    # ChiNext
    Listing("300059.SZ", "东方财富", 23.45),
    Listing("300760.SZ", "迈瑞医疗", 238.10),
    Listing("688981.SH", "中芯国际", 88.66),     # STAR
    Listing("688111.SH", "金山办公", 286.30),
    Listing("688041.SH", "海光信息", 142.75),
    Listing("830799.BJ", "艾融软件", 32.18),     # Beijing
    Listing("920002.BJ", "万达轴承", 41.20),
    Listing("600289.SH", "ST信通", 3.37),        # ST, main board
    Listing("000004.SZ", "*ST国华", 6.12),
)


def pick(count: int) -> list[Listing]:
    """The first `count` listings, cycling the universe's board mix; at most its size."""
    if count < 1:
        raise ValueError("need at least one stock")
    return list(UNIVERSE[: min(count, len(UNIVERSE))])
