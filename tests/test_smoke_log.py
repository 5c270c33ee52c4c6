from streams.codec import encode_record, decode_record
from streams.log import PartitionLog


async def test_append_then_read(redis, keys):
    log = PartitionLog(redis, keys, "ticks", maxlen=10_000)
    first = await log.append(0, [encode_record(b"a", b"1"), encode_record(b"b", b"2")])
    assert first == 0
    assert await log.append(0, [encode_record(None, b"3")]) == 2
    recs, bad = await log.read_records(0, 1)
    assert [(r.offset, r.value) for r in recs] == [(1, b"2"), (2, b"3")]
    assert bad == []
    assert await log.bounds(0) == (0, 3)
