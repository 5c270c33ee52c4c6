"""The signal store: one active row per strategy and code, every change with its outbox row in
the same transaction, imports in one transaction and idempotent; and the CLI over it."""

import json
import os
import subprocess
import sys
from datetime import date

import asyncpg
import pytest

from schemas.events import Signal, SignalChange
from streams.errors import BadSignals, SignalNotFound
from streams.pg import create_pool, upgrade
from streams.signals import SignalStore, plan, read_csv
from tests.signals_harness import REPO, codes, outbox, sig, sql


@pytest.fixture
async def store(pg_url):
    await upgrade(pg_url)
    pool = await create_pool(pg_url)
    yield SignalStore(pool)
    await pool.close()


async def rows(pg_url):
    return [tuple(r) for r in await sql(pg_url, "SELECT strategy, ts_code, signal_price FROM signals ORDER BY 1, 2")]


async def test_add_keeps_one_active_row_per_strategy_and_code(store, pg_url):
    assert await store.add(sig("600519.SH", price=1480.0)) == "added"
    assert await store.add(sig("600519.SH", price=1490.0)) == "updated"
    assert await store.add(sig("600519.SH", price=1490.0)) == "unchanged"
    assert await store.add(sig("600519.SH", strategy="breakout", price=1500.0)) == "added"
    assert await rows(pg_url) == [("breakout", "600519.SH", 1500.0), ("volume_wave", "600519.SH", 1490.0)]
    assert await store.signals("volume_wave") == [sig("600519.SH", price=1490.0)]
    changes = [SignalChange.model_validate_json(r.change) for r in await outbox(pg_url)]
    assert [(c.action, c.signal.strategy, c.signal.signal_price) for c in changes] == [
        ("add", "volume_wave", 1480.0), ("add", "volume_wave", 1490.0), ("add", "breakout", 1500.0)]


async def test_remove_deletes_the_row_and_its_outbox_row_carries_the_removed_signal(store, pg_url):
    await store.add(sig("600519.SH", reason="volume breakout"))
    await store.add(sig("000001.SZ"))
    gone = await store.remove("volume_wave", "sh600519")  # any accepted spelling of the code
    assert gone == sig("600519.SH", reason="volume breakout")
    assert await rows(pg_url) == [("volume_wave", "000001.SZ", 10.0)]
    last = (await outbox(pg_url))[-1]
    assert (last.action, SignalChange.model_validate_json(last.change).signal) == ("remove", gone)


async def test_removing_a_signal_that_is_not_there_is_an_error_and_writes_nothing(store, pg_url):
    await store.add(sig("600519.SH"))
    with pytest.raises(SignalNotFound, match="no signal on 000001.SZ"):
        await store.remove("volume_wave", "000001.SZ")
    with pytest.raises(SignalNotFound):
        await store.remove("breakout", "600519.SH")
    assert len(await outbox(pg_url)) == 1


async def test_a_change_whose_outbox_row_fails_leaves_neither(store, pg_url):
    await store.add(sig("600519.SH"))
    # the outbox refuses one code: the failure comes after the signal row was written
    await sql(pg_url, "ALTER TABLE signal_outbox ADD CONSTRAINT refuse CHECK (ts_code <> '000001.SZ')")
    with pytest.raises(asyncpg.CheckViolationError):
        await store.add(sig("000001.SZ"))
    with pytest.raises(asyncpg.CheckViolationError):
        await store.import_signals([sig(c) for c in codes(50)] + [sig("000001.SZ")])
    assert await rows(pg_url) == [("volume_wave", "600519.SH", 10.0)]
    assert [r.ts_code for r in await outbox(pg_url)] == ["600519.SH"]


async def test_a_transaction_that_raises_leaves_neither(store, pg_url):
    with pytest.raises(RuntimeError):
        async with store.transaction() as tx:
            await tx.add(sig("600519.SH"))
            await tx.add(sig("000001.SZ"))
            raise RuntimeError("the caller changed its mind")
    assert await rows(pg_url) == [] and await outbox(pg_url) == []


async def test_import_is_one_transaction_and_a_reimport_writes_nothing(store, pg_url):
    wanted = [sig(c, price=10 + i / 100) for i, c in enumerate(codes(500))]
    assert tuple(await store.import_signals(wanted)) == (500, 0, 0, 0)
    first = await outbox(pg_url)
    assert [r.ts_code for r in first] == [s.ts_code for s in wanted]
    assert len({r.committed_ms for r in first}) == 1, "one transaction: one commit time"

    assert tuple(await store.import_signals(wanted)) == (0, 0, 0, 500)
    assert await outbox(pg_url) == first, "re-import writes no outbox row"

    changed = wanted[:]
    changed[7] = sig(wanted[7].ts_code, price=99.0)
    assert tuple(await store.import_signals(changed)) == (0, 1, 0, 499)
    new = (await outbox(pg_url))[len(first):]
    assert [(r.action, r.ts_code) for r in new] == [("add", wanted[7].ts_code)]


async def test_import_with_replace_removes_what_the_file_lacks_of_its_strategies(store, pg_url):
    await store.import_signals([sig(c) for c in codes(5)] + [sig("600519.SH", strategy="breakout")])
    result = await store.import_signals([sig(c) for c in codes(3)], replace=True)
    assert tuple(result) == (0, 0, 2, 3)
    assert await rows(pg_url) == [("breakout", "600519.SH", 10.0)] + [("volume_wave", c, 10.0) for c in codes(3)]
    assert tuple(await store.import_signals([sig(c) for c in codes(3)], replace=True)) == (0, 0, 0, 3)


def test_plan_turns_the_current_list_into_the_wanted_one():
    a, b, c = sig("600519.SH"), sig("000001.SZ"), sig("300750.SZ")
    b2 = sig("000001.SZ", price=11.0)
    assert plan([a, b], [a, b]) == []
    assert plan([a, b], [b2, c]) == [SignalChange(action="add", signal=b2), SignalChange(action="add", signal=c)]
    assert plan([a, b], [b2, c], replace=True) == [
        SignalChange(action="remove", signal=a), SignalChange(action="add", signal=b2),
        SignalChange(action="add", signal=c)]


def test_csv_rows_become_signals():
    text = ("strategy,ts_code,name,side,signal_date,signal_price,confidence,reason\n"
            "volume_wave,600519,贵州茅台,buy,20261120,1480.5,0.8,量能突破\n"
            "volume_wave,sz000001,,sell,2026-11-21,,,\n\n")
    assert read_csv(text) == [
        Signal(strategy="volume_wave", ts_code="600519.SH", name="贵州茅台", side="buy", signal_date=date(2026, 11, 20),
               signal_price=1480.5, confidence=0.8, reason="量能突破"),
        Signal(strategy="volume_wave", ts_code="000001.SZ", side="sell", signal_date=date(2026, 11, 21)),
    ]
    assert read_csv("ts_code,signal_date\n600519.SH,2026-11-20\n", strategy="breakout")[0].strategy == "breakout"


@pytest.mark.parametrize(("text", "message"), [
    ("ts_code,signal_date,price\n600519.SH,2026-11-20,1\n", "unknown column(s) price"),
    ("ts_code,strategy\n600519.SH,volume_wave\n", "missing column(s) signal_date"),
    ("ts_code,signal_date\n600519.SH,2026-11-20\n", "missing column(s) strategy"),
    ("strategy,ts_code,signal_date\nvw,600519.SH,2026-11-20\nvw,123456,2026-11-20\n", "line 3: ts_code"),
    ("strategy,ts_code,signal_date,confidence\nvw,600519.SH,2026-11-20,2\n", "line 2: confidence"),
    ("strategy,ts_code,signal_date\nbad name,600519.SH,2026-11-20\n", "line 2: strategy 'bad name'"),
    ("strategy,ts_code,signal_date\nvw,600519.SH,2026-11-20\nvw,sh600519,2026-11-21\n", "more than one signal for: vw 600519.SH"),
])
def test_a_bad_csv_is_refused_naming_what_is_wrong(text, message):
    with pytest.raises(BadSignals, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_csv(text)


def tickwave(pg_url, *args, check=True):
    env = {**os.environ, "DATABASE_URL": pg_url, "TICKWAVE_LOG_LEVEL": "WARNING"}
    proc = subprocess.run([sys.executable, "-m", "tickwave", "signals", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


async def test_the_cli_adds_lists_removes_and_imports(pg_url, tmp_path):
    await upgrade(pg_url)
    assert tickwave(pg_url, "add", "volume_wave", "600519", "--price", "1480.5", "--date", "2026-11-20",
                    "--name", "贵州茅台", "--reason", "量能突破").stdout == "added volume_wave 600519.SH\n"
    assert tickwave(pg_url, "add", "volume_wave", "000001.SZ", "--date", "20261121", "--side", "sell").returncode == 0
    listed = json.loads(tickwave(pg_url, "list", "volume_wave", "--format", "json").stdout)
    assert [(r["ts_code"], r["side"], r["signal_date"]) for r in listed] == [
        ("000001.SZ", "sell", "2026-11-21"), ("600519.SH", "buy", "2026-11-20")]

    exported = tmp_path / "signals.csv"
    exported.write_text(tickwave(pg_url, "list", "--format", "csv").stdout)
    assert tickwave(pg_url, "import", str(exported)).stdout == \
        "imported signals.csv: 0 added, 0 updated, 0 removed, 2 unchanged\n"
    gbk = tmp_path / "gbk.csv"
    gbk.write_bytes("ts_code,name,signal_date\n300750,宁德时代,2026-11-22\n".encode("gb18030"))
    assert "1 added" in tickwave(pg_url, "import", str(gbk), "--strategy", "volume_wave").stdout

    assert tickwave(pg_url, "remove", "volume_wave", "600519.SH").stdout == "removed volume_wave 600519.SH\n"
    missing = tickwave(pg_url, "remove", "volume_wave", "600519.SH", check=False)
    assert missing.returncode == 1 and "no signal on 600519.SH" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert len(await outbox(pg_url)) == 4  # two adds, the GBK file's add, one remove


async def test_the_cli_says_when_the_schema_is_missing(pg_url):
    proc = tickwave(pg_url, "list", check=False)
    assert proc.returncode == 1 and "tickwave db upgrade" in proc.stderr
