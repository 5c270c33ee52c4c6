"""faust's Conductor (which topics the consumer subscribes to, and which channels get their
messages), with what replies to agent.ask / join / map need, in clients and in workers.

A client (faust's start_client: a CLI command, a script, a web process asking agents) may
register its reply topic after it started: agent.join and agent.map start the client first.
faust then waits 45 s before it subscribes (to coalesce a worker's changes into one
rebalance), never routes the new topic in a client (it indexes a client's channels once,
when the client starts), and routes every registered channel, including the reply topic
its ReplyConsumer registers 3 s before it starts iterating a copy of it. Here a client has
no group to rebalance, so it subscribes at once; and it subscribes to, and routes messages
to, only channels something iterates: a message fetched for no reader would be lost, and
an unread queue fills up and blocks delivery. The client's start positions
(Transport.client_start) make the later subscription miss nothing. A worker routes
everything faust routes except that unread reply topic.
"""

from __future__ import annotations

from collections.abc import Iterable

from faust.transport import conductor
from faust.types import TP, AppT, TopicT

CLIENT_RESUBSCRIBE_AFTER = 0.1  # seconds: coalesces a burst of registrations; nothing to rebalance
WORKER_RESUBSCRIBE_AFTER = conductor.Conductor._resubscribe_sleep_lock_seconds


class Conductor(conductor.Conductor):
    """faust's Conductor; in a client, a topic is subscribed and routed once something reads it."""

    @property
    def _resubscribe_sleep_lock_seconds(self) -> float:  # type: ignore[override]
        return CLIENT_RESUBSCRIBE_AFTER if self.app.client_only else WORKER_RESUBSCRIBE_AFTER

    def add(self, topic: TopicT) -> None:
        """Register a channel. faust resubscribes only for a topic name not subscribed yet; a
        client must also route a new reader of a subscribed topic (the copy of the reply topic
        its ReplyConsumer iterates)."""
        new = topic not in self._topics
        super().add(topic)
        if new and self.app.client_only and _reads(topic):
            self._flag_changes()

    async def _update_indices(self) -> Iterable[str]:
        index = await super()._update_indices()
        if not self.app.client_only:
            return index
        await self.on_client_only_start()
        return sorted({topic for channel in self._read_channels() for topic in channel.topics})

    def _update_tp_index(self, assigned: set[TP]) -> None:
        """A worker's routing after a rebalance, without the reply topic faust's ReplyConsumer
        registers and never reads (it reads a copy). Routed there too, each reply stayed
        unacked (that copy is never taken), so a worker asking its agents never finished a
        rebalance or a stop, the replies came again after a rebalance, which faust's promises
        do not survive (InvalidStateError), and once the unread queue was full
        (stream_buffer_maxsize) delivery failed."""
        super()._update_tp_index(assigned)
        replies = reply_topics(self.app)
        unread = [c for c in self._topics if not _reads(c) and replies.intersection(c.topics)]
        for channels in self._tp_index.values():
            for channel in unread:
                channels.discard(channel)

    async def on_client_only_start(self) -> None:
        """Route each topic a client reads to the channels iterating it (faust's client takes
        every message of a topic as its partition 0)."""
        for channel in self._read_channels():
            for topic in channel.topics:
                self._tp_index[TP(topic, 0)].add(channel)
        self._update_callback_map()

    def _read_channels(self) -> list[TopicT]:
        return [channel for channel in self._topics if _reads(channel)]


def _reads(channel: TopicT) -> bool:
    """Whether something iterates the channel: faust iterates a copy of a topic (Topic.__aiter__)."""
    return bool(getattr(channel, "is_iterator", False))


def reply_topics(app: AppT) -> set[str]:
    """The reply topics faust's ReplyConsumer reads in this process (faust keeps no public list)."""
    return set(getattr(getattr(app, "_reply_consumer", None), "_fetchers", None) or ())
