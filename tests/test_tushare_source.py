"""The Tushare source, offline: recorded Sina answers stubbed at the HTTP layer (requests)."""

import asyncio
import re
from datetime import timedelta
from pathlib import Path

import pytest
import requests
import responses

from agents.ingest import TickWriter
from agents.sources.tushare import MAX_CODES_PER_CALL, SourceFailure, TushareConfigError, TushareSource

RECORDED = (Path(__file__).parent / "fixtures" / "sina_realtime_quote.txt").read_bytes()
SINA = re.compile(r"http://hq\.sinajs\.cn/rn=\d+&list=.*")
VERIFY = "http://api.tushare.pro/dataapi/sdk-event"
CODES = ["600519.SH", "000001.SZ", "300750.SZ", "830799.BJ", "688981.SH"]


def answer_ok(rsps, body=RECORDED):
    rsps.add(responses.POST, VERIFY, json={"message": "success"})
    rsps.add(responses.GET, SINA, body=body, content_type="application/javascript; charset=GBK")


def source(**kw):
    return TushareSource(CODES, token="recorded-token", interval=0.01, **kw)


async def test_recorded_sina_answer_becomes_correct_ticks(redis, keys):
    with responses.RequestsMock() as rsps:
        answer_ok(rsps)
        ticks = await source().poll()
        sent = rsps.calls[-1].request
        assert "list=sh600519,sz000001,sz300750,bj830799,sh688981" in sent.url
        assert sent.headers["referer"] == "https://finance.sina.com.cn/"
    by_code = {t["ts_code"]: t for t in ticks}
    assert set(by_code) == {"600519.SH", "000001.SZ", "300750.SZ", "830799.BJ"}  # 688981 answered empty
    moutai = by_code["600519.SH"]
    assert (moutai["name"], moutai["price"], moutai["pre_close"]) == ("贵州茅台", 1495.5, 1480.0)
    assert moutai["volume"] == 1821367  # shares
    assert moutai["amount"] == 2719485521.0  # yuan
    writer = TickWriter(redis, keys, partitions=8, source="tushare")
    await writer.write(ticks)
    assert writer.stats.appended == 4 and writer.stats.rejected_total == 0
    from tests.test_ingest import all_ticks
    from schemas.events import Tick

    stored = [Tick.model_validate_json(r.value) for _, r in await all_ticks(redis, keys)]
    t = next(x for x in stored if x.ts_code == "600519.SH")
    assert t.time.utcoffset() == timedelta(hours=8) and (t.time.hour, t.time.minute, t.time.second) == (10, 30, 3)
    assert t.time.date().isoformat() == "2026-11-24"


def test_no_token_is_refused_at_once():
    with pytest.raises(TushareConfigError, match="TICKWAVE_TUSHARE_TOKEN"):
        TushareSource(CODES, token=None)


async def test_codes_are_asked_at_most_fifty_per_call():
    asked = []

    def fetch(chunk):
        asked.append(len(chunk))
        return None

    src = TushareSource([f"{600000 + i}.SH" for i in range(120)], token="t", fetch=fetch)
    with pytest.raises(SourceFailure):
        await src.poll()
    assert asked == [MAX_CODES_PER_CALL, MAX_CODES_PER_CALL, 20]


@pytest.mark.parametrize(
    ("stub", "kind"),
    [
        (lambda r: (r.add(responses.POST, VERIFY, json={"message": "success"}),
                    r.add(responses.GET, SINA, body=requests.ConnectionError("network down")),
                    r.add(responses.GET, SINA, body=requests.ConnectionError("network down")),
                    r.add(responses.GET, SINA, body=requests.ConnectionError("network down"))), "network"),
        (lambda r: r.add(responses.POST, VERIFY, json={"message": "fail", "msg": "抱歉，您每分钟最多访问该接口2次"}),
         "rate_limited"),
        (lambda r: (r.add(responses.POST, VERIFY, json={"message": "success"}),
                    r.add(responses.GET, SINA, body=b"")), "empty"),
        (lambda r: r.add(responses.POST, VERIFY, json={"message": "fail", "msg": "token不对"}), "permission"),
    ],
    ids=["network", "rate_limited", "empty", "permission"],
)
async def test_each_failure_is_survived_counted_and_polling_recovers(stub, kind, capsys):
    src = source(retries=2)
    src.max_backoff = 0.05
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        for _ in range(2):  # a streak of two failed polls
            stub(rsps)
        batches = src.batches()
        got = []

        async def first_good():
            async for batch in batches:
                got.append(batch)
                return

        task = asyncio.create_task(first_good())
        deadline = asyncio.get_running_loop().time() + 5
        while src.failures[kind] < 2:
            assert asyncio.get_running_loop().time() < deadline, f"no second {kind} failure"
            await asyncio.sleep(0.01)
        rsps.reset()
        answer_ok(rsps)  # the network comes back
        await asyncio.wait_for(task, 5)
        await batches.aclose()
    assert src.failures[kind] >= 2
    assert len(got[0]) == 4
    assert src.failing is None and src.delay == src.interval  # backoff reset after recovery


async def test_a_failure_streak_is_logged_once(caplog):
    src = source()
    src.max_backoff = 0.01
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        for _ in range(5):
            rsps.add(responses.POST, VERIFY, json={"message": "fail", "msg": "抱歉，您每分钟最多访问该接口2次"})
        for _ in range(5):
            with pytest.raises(SourceFailure) as info:
                await src.poll()
            src._failed(info.value)
    warnings = [r for r in caplog.records if r.getMessage() == "tushare poll failing"]
    assert len(warnings) == 1 and src.failures["rate_limited"] == 5
