"""Every refusal the edge makes has its documented answer; slow clients are conflated then closed."""

import asyncio
import math
import random
import time
import uuid
from collections import Counter
from contextlib import AsyncExitStack

import aiohttp
import jwt
import pytest
from prometheus_client import REGISTRY

from streams.events import EventLog
from tests.edge_harness import edge_connections, edge_settings, running_edge, stored_keys, ws_client
from tests.factories import price_changes

SECRET = "test-secret-with-enough-length-for-hs256"


def token(strategies, *, secret=SECRET, exp_in=300):
    return jwt.encode({"sub": "u1", "strategies": strategies, "exp": int(time.time()) + exp_in}, secret, "HS256")


@pytest.fixture
async def edge(redis_url, keys, redis):
    async with running_edge(edge_settings(redis_url, keys, edge_max_frame_bytes=1024, edge_max_subscriptions=2,
                                          edge_rate_per_s=5, edge_rate_burst=10)) as base:
        yield base


async def test_a_frame_over_the_size_cap_is_closed_with_1009(edge):
    async with ws_client(edge) as c:
        await c.next()
        await c.send('{"type":"ping","pad":"' + "x" * 2000 + '"}')
        assert await c.closed() == 1009


@pytest.mark.parametrize(
    ("frame", "code"),
    [("{not json", "bad_json"), ('{"type":"launch"}', "unknown_type"),
     ('{"type":"subscribe","subscription_type":"fund","target":"x"}', "bad_message"),
     ('{"type":"subscribe","subscription_type":"stock","target":"999999"}', "bad_message"),
     ('{"type":"subscribe","target":"bad{name}"}', "bad_message"),
     # well-formed JSON with a wrongly typed field: an error frame, never a closed connection
     ('{"type":["subscribe"]}', "bad_message"), ('{"type":{"a":1}}', "bad_message"),
     ('{"type":"subscribe","target":"x","id":{"a":1}}', "bad_message"),
     ('{"type":"subscribe","target":"x","last_event_id":5}', "bad_message"),
     ('{"type":"subscribe","target":"x","last_event_id":"18446744073709551616-0"}', "bad_message")],
)
async def test_a_bad_frame_gets_an_error_and_the_connection_stays_open(edge, frame, code):
    async with ws_client(edge) as c:
        await c.next()
        await c.send(frame)
        err = await c.next()
        assert err["type"] == "error" and err["code"] == code and err["error"]
        await c.send('{"type":"ping"}')
        assert (await c.next())["type"] == "pong"


async def test_a_bad_frame_never_closes_other_clients(edge):
    async with ws_client(edge) as good, ws_client(edge) as bad:
        await good.next()
        await bad.next()
        await bad.send("\x00\x01garbage")
        assert (await bad.next())["type"] == "error"
        await good.send('{"type":"ping"}')
        assert (await good.next())["type"] == "pong"


async def test_too_many_subscriptions_is_an_error_then_4029(edge, redis, keys):
    log = EventLog(redis, keys)
    for name in ("a1", "a2", "a3"):
        await log.append_events(name, price_changes(1, name))
    async with ws_client(edge) as c:
        await c.next()
        for name in ("a1", "a2"):
            await c.send({"type": "subscribe", "target": name})
            await c.next(type="subscribed")
        await c.send({"type": "subscribe", "target": "a3"})
        err = await c.next(type="error")
        assert err["code"] == "too_many_subscriptions"
        assert await c.closed() == 4029


async def test_too_many_messages_per_second_is_an_error_then_4029(edge):
    async with ws_client(edge) as c:
        await c.next()
        for _ in range(30):
            await c.send('{"type":"ping"}')
        assert await c.closed() == 4029
        assert any(f["type"] == "error" and f["code"] == "rate_limited" for f in c.frames)


async def test_missing_or_bad_token_closes_4001(redis_url, keys, redis):
    async with running_edge(edge_settings(redis_url, keys, edge_jwt_secret=SECRET)) as base:
        for query in ("", "?token=not-a-jwt", f"?token={token(['*'], secret='another-secret-of-enough-length-for-hs256')}",
                      f"?token={token(['*'], exp_in=-10)}"):
            async with ws_client(base, "/ws" + query) as c:
                assert await c.closed() == 4001
                assert c.frames and c.frames[0]["type"] == "error"


async def test_a_token_allows_only_its_strategies(redis_url, keys, redis):
    log = EventLog(redis, keys)
    for name in ("volume_wave", "breakout"):
        await log.append_events(name, price_changes(1, name))
    async with running_edge(edge_settings(redis_url, keys, edge_jwt_secret=SECRET)) as base:
        headers = {"Authorization": f"Bearer {token(['volume_wave'])}"}
        async with ws_client(base, headers=headers) as c:
            assert (await c.next())["type"] == "connected"
            await c.send({"type": "subscribe", "target": "volume_wave"})
            assert (await c.next(type="subscribed"))["target"] == "volume_wave"
            await c.send({"type": "subscribe", "target": "breakout", "id": 7})
            err = await c.next(type="error")
            assert err["code"] == 403 and err["id"] == 7
        async with ws_client(base, f"/ws?token={token('*')}") as c:
            await c.next()
            await c.send({"type": "subscribe", "target": "breakout"})
            assert (await c.next(type="subscribed"))["target"] == "breakout"


async def test_origin_not_allowed_is_refused(redis_url, keys, redis):
    async with running_edge(edge_settings(redis_url, keys, edge_allowed_origins="https://app.example")) as base:
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await s.ws_connect(base + "/ws", origin="https://evil.example")
            assert info.value.status == 403
            async with s.ws_connect(base + "/ws", origin="https://app.example") as ws:
                assert (await ws.receive_json())["type"] == "connected"


async def test_connections_per_address_are_capped(redis_url, keys, redis):
    async with running_edge(edge_settings(redis_url, keys, edge_max_connections_per_ip=2)) as base:
        async with ws_client(base) as a, ws_client(base) as b:
            await a.next()
            await b.next()
            async with aiohttp.ClientSession() as s:
                with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                    await s.ws_connect(base + "/ws")
                assert info.value.status == 429
        async with ws_client(base) as c:  # freed again once they left
            assert (await c.next())["type"] == "connected"


def edge_label_values() -> set[str]:
    """Every label value of every edge metric."""
    return {value for metric in REGISTRY.collect() if metric.name.startswith("tickwave_edge")
            for sample in metric.samples for value in sample.labels.values()}


async def test_made_up_strategies_are_refused_and_create_no_state(redis_url, keys, redis):
    log = EventLog(redis, keys)
    await log.append_events("volume_wave", price_changes(3))
    made_up = [f"nope_{uuid.uuid4().hex[:12]}" for _ in range(300)]
    before = await stored_keys(redis, keys)
    node = f"made-up-{uuid.uuid4().hex[:8]}"
    async with running_edge(edge_settings(redis_url, keys, edge_node=node)) as base, AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(ws_client(base)) for _ in range(10)]
        for c in clients:
            await c.next(type="connected")
        for i, name in enumerate(made_up):  # 30 per connection, all sent at once (auth off, the default)
            await clients[i % 10].send({"type": "subscribe", "target": name, "id": i})
        errors = {}
        for c in clients:
            for _ in range(30):
                err = await c.next(type="error")
                errors[err["id"]] = err
        assert set(errors) == set(range(300))
        assert {e["code"] for e in errors.values()} == {"unknown_strategy"}
        assert {e["details"]["target"] for e in errors.values()} == set(made_up)
        # real subscribes keep working, on every one of those connections
        for c in clients:
            await c.send({"type": "subscribe", "target": "volume_wave"})
            assert (await c.next(type="subscribed"))["target"] == "volume_wave"
            assert (await c.next(type="price_update"))["snapshot"] is True
        live = await log.append_events("volume_wave", price_changes(2, start=3))
        for c in clients:
            while c.event_ids() != live:
                await c.next()
        assert await edge_connections(redis, node) <= 4 + 1  # the pool (4 by default) and one reader
    assert await stored_keys(redis, keys) == before, "a made-up name created a key (and its group)"
    assert edge_label_values().isdisjoint(made_up), "a made-up name became a metric label"


async def test_a_strategy_that_appears_later_is_subscribable_from_then_on(edge, redis, keys):
    log = EventLog(redis, keys)
    async with ws_client(edge) as c:
        await c.next()
        await c.send({"type": "subscribe", "target": "late_bloomer", "id": 1})
        err = await c.next(type="error")
        assert (err["code"], err["id"], err["details"]) == ("unknown_strategy", 1, {"target": "late_bloomer"})
        await c.send({"type": "subscribe", "subscription_type": "market", "target": "all", "id": 2})
        err = await c.next(type="error")  # `market` is a strategy name like any other
        assert (err["code"], err["id"], err["details"]) == ("unknown_strategy", 2, {"target": "market"})
        first = await log.append_events("late_bloomer", price_changes(2, "late_bloomer"))
        await c.send({"type": "subscribe", "target": "late_bloomer", "id": 3})
        assert (await c.next(type="subscribed"))["id"] == 3
        snap = await c.next(type="price_update")
        assert snap["snapshot"] is True and [r["event_id"] for r in snap["data"]] == first
        live = await log.append_events("late_bloomer", price_changes(2, "late_bloomer", start=2))
        while c.event_ids() != live:
            await c.next()


async def test_a_node_follows_at_most_max_tails_streams(redis_url, keys, redis):
    log = EventLog(redis, keys)
    for name in ("s1", "s2", "s3"):
        await log.append_events(name, price_changes(1, name))
    async with running_edge(edge_settings(redis_url, keys, edge_max_tails=2)) as base:
        async with ws_client(base) as a, ws_client(base) as b:
            await a.next()
            await b.next()
            for name in ("s1", "s2"):
                await a.send({"type": "subscribe", "target": name})
                await a.next(type="price_update")
            await b.send({"type": "subscribe", "target": "s1"})  # an existing tail: no new one needed
            await b.next(type="price_update")
            await b.send({"type": "subscribe", "target": "s3", "id": 9})
            err = await b.next(type="error")
            assert (err["code"], err["id"]) == ("node_full", 9)
            await b.send('{"type":"ping"}')
            assert (await b.next(type="pong"))["type"] == "pong"  # the connection stays
            await a.send({"type": "unsubscribe", "target": "s2"})
            await a.next(type="unsubscribed")
            await b.send({"type": "subscribe", "target": "s3"})
            assert (await b.next(type="subscribed"))["target"] == "s3"


def live_rows(client) -> list[tuple[str, str]]:
    """(target, event id) of every live price row the client received."""
    return [(f["target"], row["event_id"]) for f in client.frames
            if f["type"] == "price_update" and not f["snapshot"] for row in f["data"]]


async def test_500_strategies_are_read_over_at_most_5_redis_connections_and_every_event_arrives_once(
        redis_url, keys, redis):
    log = EventLog(redis, keys)
    names = [f"s{i:03d}" for i in range(500)]
    for name in names:
        await log.append_events(name, price_changes(1, name))
    node = f"mux-{uuid.uuid4().hex[:8]}"
    settings = edge_settings(redis_url, keys, edge_node=node, edge_max_subscriptions=50, edge_rate_burst=60)
    peak = [0]

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], await edge_connections(redis, node))
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    appended: dict[str, list[str]] = {name: [] for name in names}
    try:
        async with running_edge(settings) as base, AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(ws_client(base)) for _ in range(10)]
            for i, c in enumerate(clients):  # one client's 500 subscriptions, 50 per connection
                await c.next(type="connected")
                for name in names[i * 50:(i + 1) * 50]:
                    await c.send({"type": "subscribe", "target": name})
            for c in clients:
                for _ in range(50):
                    await c.next(type="subscribed", timeout=20)
            rng = random.Random(13)
            offset, end = 1, time.monotonic() + 2.0
            while time.monotonic() < end:  # a couple of seconds of events over random strategies
                for name in rng.sample(names, 20):
                    appended[name] += await log.append_events(name, price_changes(2, name, start=offset))
                offset += 2
            expected = Counter((name, i) for name, ids in appended.items() for i in ids)
            deadline = time.monotonic() + 20
            for i, c in enumerate(clients):
                want = sum(len(appended[name]) for name in names[i * 50:(i + 1) * 50])
                while len(live_rows(c)) < want:
                    assert time.monotonic() < deadline, "events missing after 20 s"
                    await c.next(timeout=deadline - time.monotonic())
            # anything sent twice would arrive by now
            await asyncio.gather(*(c.drain(quiet=0.3) for c in clients))
    finally:
        sampler.cancel()
    assert sum(expected.values()) > 1000
    received = Counter(row for c in clients for row in live_rows(c))
    assert received == expected, "an event missing, duplicated or sent to the wrong target"
    assert 1 <= peak[0] <= 5, f"the node held {peak[0]} Redis connections"


class RawSlowClient:
    """A WebSocket client on a bare socket with a tiny receive buffer that stops reading."""

    def __init__(self, port: int):
        self.port = port

    async def connect_and_subscribe(self, target: str) -> None:
        import base64
        import os
        import socket

        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", self.port))
        key = base64.b64encode(os.urandom(16)).decode()
        await loop.sock_sendall(sock, (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += await loop.sock_recv(sock, 1)
        assert b" 101 " in head
        payload = ('{"type":"subscribe","target":"%s"}' % target).encode()
        mask = os.urandom(4)
        frame = bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        await loop.sock_sendall(sock, frame)
        self.sock = sock  # and never read again

    async def close_code(self) -> int | None:
        """Read everything now (the server runs on this loop: never block it); the close code sent."""
        import struct

        loop = asyncio.get_running_loop()
        data = b""
        try:
            while True:
                chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 20), 5)
                if not chunk:
                    break
                data += chunk
        except (OSError, asyncio.TimeoutError):
            pass
        finally:
            self.sock.close()
        i, code = 0, None
        while i + 2 <= len(data):  # walk the server's (unmasked) frames
            opcode, n = data[i] & 0x0F, data[i + 1] & 0x7F
            i += 2
            if n == 126:
                n = struct.unpack(">H", data[i:i + 2])[0]
                i += 2
            elif n == 127:
                n = struct.unpack(">Q", data[i:i + 8])[0]
                i += 8
            if opcode == 0x8 and n >= 2:
                code = struct.unpack(">H", data[i:i + 2])[0]
            i += n
        return code


async def test_a_slow_client_is_conflated_then_closed_while_a_fast_one_keeps_its_latency(redis_url, keys, redis):
    from edge import metrics

    log = EventLog(redis, keys)
    await log.append_events("volume_wave", price_changes(3))
    conflations_before = metrics.CONFLATIONS._value.get()
    closes_before = metrics.SLOW_CLOSES._value.get()
    # a queue cap many batches deep: the slow client lags through hundreds of batches (each
    # conflation shrinks its queue to three rows, and only the fourth without a drain closes it)
    settings = edge_settings(redis_url, keys, edge_send_queue_bytes=SLOW_CAP, edge_socket_sndbuf=8192)
    async with running_edge(settings) as base:
        slow = RawSlowClient(settings.edge_port)
        await slow.connect_and_subscribe("volume_wave")
        async with ws_client(base) as fast:
            await fast.next()
            await fast.send({"type": "subscribe", "target": "volume_wave"})
            await fast.next(type="price_update")
            latencies, offset = [], 1000
            for _ in range(5000):
                ids = await log.append_events("volume_wave", price_changes(SLOW_BATCH, start=offset))
                offset += SLOW_BATCH
                t = time.monotonic()
                await _wait_for_id(fast, ids[-1])
                if metrics.SLOW_CLOSES._value.get() > closes_before:
                    break
                latencies.append(time.monotonic() - t)  # a batch sent while the slow client lagged
            assert metrics.SLOW_CLOSES._value.get() > closes_before, "the slow client was never closed"
            assert metrics.CONFLATIONS._value.get() - conflations_before >= 2
            assert len(latencies) >= 200, f"only {len(latencies)} samples while the slow client lagged"
            ordered = sorted(latencies)
            p99, median = ordered[math.ceil(len(ordered) * 0.99) - 1], ordered[len(ordered) // 2]
            assert p99 < SLOW_P99_S, f"the fast client's p99 was {p99:.3f}s while a slow one lagged"
            assert median < SLOW_MEDIAN_S, f"the fast client's median was {median:.3f}s while a slow one lagged"
        assert await slow.close_code() == 4008


SLOW_CAP = 512 * 1024
SLOW_BATCH = 20
# measured with the slow client lagging: median about 1 ms, p99 under 10 ms (281 samples); a
# fast client must not wait on a slow one
SLOW_MEDIAN_S = 0.02
SLOW_P99_S = 0.1


async def _wait_for_id(client, event_id):
    """Read until a live frame carries `event_id` (it must come within 5 s)."""
    if event_id in client.event_ids():
        return
    while True:
        frame = await client.next(timeout=5)
        if frame["type"] == "price_update" and any(r["event_id"] == event_id for r in frame["data"]):
            return


async def test_bad_frames_are_logged_in_one_line_without_a_traceback(edge, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="tickwave.edge")
    async with ws_client(edge) as c:
        await c.next()
        for frame in ("{oops", '{"type":"warp"}', '{"type":"subscribe"}', "\x00"):
            await c.send(frame)
            assert (await c.next())["type"] == "error"
    bad = [r for r in caplog.records if r.getMessage() == "bad frame"]
    assert len(bad) == 4
    assert all(r.exc_info is None and r.levelno == logging.INFO for r in caplog.records if r.name == "tickwave.edge")
