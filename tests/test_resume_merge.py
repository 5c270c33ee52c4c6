"""The resume merge, as pure logic: replay, live batches and the last id sent, in every order.

A subscriber resuming from an id gets a replay up to some id R, while the node's tail
may deliver live batches that start before R (they raced the replay), straddle it or
follow it, before or after the replay ends. Whatever the interleaving, the client must
see every event after its resume point exactly once, in id order.
"""

from __future__ import annotations

import itertools
import random

import orjson
import pytest

from edge.conn import Outgoing
from edge.frames import Batch, batch_of
from edge.subscription import Subscription, outgoing
from streams.codec import StoredEvent, parse_id
from tests.factories import price_change, signal_change


class Recorder:
    """Stands in for a connection's Sender: records what would be queued."""

    def __init__(self) -> None:
        self.items: list[Outgoing] = []

    def put(self, item: Outgoing, *, may_conflate: bool = True) -> None:
        self.items.append(item)

    def ids(self) -> list[str]:
        out = []
        for item in self.items:
            frame = orjson.loads(item.text)
            if frame["type"] == "price_update":
                out += [row["event_id"] for row in frame["data"]]
            else:
                out.append(frame["event_id"])
        return out


def eid(n: int) -> str:
    return f"1700000000000-{n}"


def event(n: int) -> StoredEvent:
    """Event n: every fifth one a signal change, the rest price changes."""
    if n % 5 == 0:
        return StoredEvent(eid(n), signal_change("add" if n % 2 else "remove"))
    return StoredEvent(eid(n), price_change(offset=n))


def batch(ns: range | list[int]) -> Batch:
    made, bad = batch_of("volume_wave", "ep", [event(n) for n in ns])
    assert made is not None and bad == 0
    return made


def subscription() -> tuple[Subscription, Recorder]:
    rec = Recorder()
    return Subscription("strategy", "volume_wave", rec), rec  # type: ignore[arg-type]


def deliver(sub: Subscription, b: Batch) -> None:
    sub.deliver(b, outgoing(b))


def test_live_batches_buffered_during_the_replay_are_sent_after_it_and_only_past_the_replay():
    sub, rec = subscription()
    deliver(sub, batch(range(3, 7)))   # raced the replay: 3..6, replay covered up to 5
    deliver(sub, batch(range(7, 9)))
    assert rec.items == []  # nothing leaves while the replay runs
    sub.go_live(parse_id(eid(5)))
    assert rec.ids() == [eid(6), eid(7), eid(8)]


def test_a_live_batch_at_or_before_the_last_id_sent_is_dropped_whole():
    sub, rec = subscription()
    sub.go_live(parse_id(eid(10)))
    deliver(sub, batch(range(8, 11)))
    assert rec.items == []


def test_a_live_batch_straddling_the_last_id_sends_only_the_newer_events():
    sub, rec = subscription()
    sub.go_live(parse_id(eid(4)))
    deliver(sub, batch(range(2, 9)))
    assert sorted(rec.ids(), key=parse_id) == [eid(n) for n in range(5, 9)]


def test_a_batch_entirely_after_the_last_id_goes_out_as_the_shared_frames():
    sub, rec = subscription()
    sub.go_live(parse_id(eid(4)))
    b = batch(range(6, 9))
    shared = outgoing(b)
    sub.deliver(b, shared)
    assert rec.items == shared  # the same objects: encoded once for every subscriber


def test_a_redelivered_batch_after_going_live_is_not_sent_twice():
    sub, rec = subscription()
    sub.go_live(None)  # a snapshot subscriber of an empty stream
    deliver(sub, batch(range(1, 4)))
    deliver(sub, batch(range(1, 4)))
    deliver(sub, batch(range(3, 6)))
    assert sorted(rec.ids(), key=parse_id) == [eid(n) for n in range(1, 6)]


def test_signal_changes_follow_the_same_rule_as_prices():
    sub, rec = subscription()
    deliver(sub, batch(range(4, 12)))  # 5 and 10 are signal changes
    sub.go_live(parse_id(eid(5)))
    assert eid(5) not in rec.ids() and eid(10) in rec.ids()


def _splits(ids: list[int], rng: random.Random) -> list[list[int]]:
    """ids cut into consecutive batches at random points."""
    cuts = sorted(rng.sample(range(1, len(ids)), k=rng.randint(0, min(4, len(ids) - 1)))) if len(ids) > 1 else []
    return [ids[a:b] for a, b in zip([0, *cuts], [*cuts, len(ids)])]


@pytest.mark.parametrize("seed", range(12))
def test_every_interleaving_delivers_each_event_after_the_resume_point_exactly_once(seed):
    rng = random.Random(seed)
    last = 12
    for replayed_to, tail_from in itertools.product(range(0, last + 1), range(1, last + 1)):
        if tail_from > replayed_to + 1:
            continue  # the tail never starts past the end of the replay: it started first
        batches = [batch(b) for b in _splits(list(range(tail_from, last + 1)), rng)]
        for live_at in range(len(batches) + 1):  # how many batches arrive before the replay ends
            sub, rec = subscription()
            for b in batches[:live_at]:
                deliver(sub, b)
            sub.go_live(parse_id(eid(replayed_to)) if replayed_to else None)
            for b in batches[live_at:]:
                deliver(sub, b)
            got = rec.ids()
            expected = [eid(n) for n in range(max(replayed_to + 1, tail_from), last + 1)]
            assert sorted(got, key=parse_id) == expected, (replayed_to, tail_from, live_at)
            assert len(got) == len(set(got)), f"duplicate: {replayed_to=} {tail_from=} {live_at=}"


def test_frames_go_out_in_event_id_order_so_a_resume_after_the_last_id_misses_nothing():
    sub, rec = subscription()
    sub.go_live(None)
    deliver(sub, batch(range(1, 13)))  # signal changes at 5 and 10 between price rows
    assert rec.ids() == [eid(n) for n in range(1, 13)]
    kinds = [orjson.loads(item.text)["type"] for item in rec.items]
    assert kinds == ["price_update", "signal_update", "price_update", "signal_update", "price_update"]
