"""The commands on the whole-market universe: `events generate --stocks 5000`, a universe file
named by TICKWAVE_UNIVERSE_FILE, and its errors (exit 2, the variable named, no traceback)."""

import os
import subprocess
import sys

from schemas.universe import DEMO_CODES, Listing, Universe, default_universe, save_universe


def tickwave(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "tickwave", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


async def test_events_generate_walks_5000_stocks_of_the_whole_market(redis_url, keys, redis):
    proc = tickwave("events", "generate", "wide", "--stocks", "5000", "--count", "60", "--rate", "0",
                    "--seed", "3", env={"REDIS_URL": redis_url, "TICKWAVE_KEY_PREFIX": keys.prefix})
    assert proc.returncode == 0, proc.stderr
    assert "wrote 60 events to wide" in proc.stdout
    assert await redis.xlen(keys.events("wide")) == 60
    codes = {member.decode() for member in await redis.hkeys(keys.snapshot("wide"))}
    market = default_universe()
    # 60 draws from 5,000 stocks: nearly every event is another stock, most outside the demo twenty
    assert len(codes) > 40 and len(codes - set(DEMO_CODES)) > 30
    assert all(code in market for code in codes)


def test_more_stocks_than_the_universe_has_is_a_usage_error():
    proc = tickwave("events", "generate", "wide", "--stocks", "5401", "--count", "1",
                    env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert proc.returncode == 2
    assert "--stocks" in proc.stderr and "5400" in proc.stderr and "Traceback" not in proc.stderr


async def test_a_universe_file_replaces_the_built_in_one(redis_url, keys, redis, tmp_path):
    mine = Universe([Listing.of("600000.SH", "浦发银行", 10.0), Listing.of("301579.SZ", "嘉控通信", 26.28)])
    path = save_universe(mine, tmp_path / "mine.parquet")
    env = {"REDIS_URL": redis_url, "TICKWAVE_KEY_PREFIX": keys.prefix, "TICKWAVE_UNIVERSE_FILE": str(path)}
    proc = tickwave("events", "generate", "mine", "--stocks", "2", "--count", "20", "--rate", "0", env=env)
    assert proc.returncode == 0, proc.stderr
    assert {m.decode() for m in await redis.hkeys(keys.snapshot("mine"))} == {"600000.SH", "301579.SZ"}
    too_many = tickwave("events", "generate", "mine", "--stocks", "3", "--count", "1", env=env)
    assert too_many.returncode == 2 and "has 2 with a previous close" in too_many.stderr


def test_a_bad_universe_file_stops_the_command_naming_the_variable(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("ts_code,name\n600000.SH,浦发银行\n999999.SH,?\n", encoding="utf-8")
    for args in (["events", "generate", "x", "--count", "1"], ["ingest", "--source", "sim"]):
        proc = tickwave(*args, env={"REDIS_URL": "redis://127.0.0.1:1/0", "TICKWAVE_UNIVERSE_FILE": str(bad),
                                    "TICKWAVE_INGEST_METRICS_PORT": "0"})
        assert proc.returncode == 2, args
        assert f"TICKWAVE_UNIVERSE_FILE: {bad}, line 3:" in proc.stderr and "Traceback" not in proc.stderr


async def test_ingest_simulates_5000_stocks_and_rejects_none(redis_url, keys, redis, tmp_path):
    import asyncio
    import signal

    from tests.test_ingest import all_ticks

    env = {**os.environ, "REDIS_URL": redis_url, "TICKWAVE_KEY_PREFIX": keys.prefix,
           "TICKWAVE_INGEST_METRICS_PORT": "0"}
    with open(tmp_path / "err", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tickwave", "ingest", "--source", "sim", "--stocks", "5000",
                                 "--interval", "0.5", "--ignore-clock", "--seed", "2"],
                                env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = asyncio.get_running_loop().time() + 30
        while len(await all_ticks(redis, keys)) < 5000:
            assert asyncio.get_running_loop().time() < deadline, "no full snapshot of 5,000 stocks appended"
            assert proc.poll() is None, (tmp_path / "err").read_text()
            await asyncio.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    log = (tmp_path / "err").read_text()
    line = next(entry for entry in log.splitlines() if "ingest stopped" in entry)
    assert " rejected=0" in line and int(line.split("appended=")[1].split()[0]) % 5000 == 0
    assert len({r.key for _, r in await all_ticks(redis, keys)}) == 5000
