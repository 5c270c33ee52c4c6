"""Every Redis key tickwave uses, in one place.

Each key carries a hash tag (`{...}`) so Redis Cluster keeps everything one
Lua script touches on one slot: a topic partition with its sequence counter,
a strategy's event stream with its epoch, snapshot and positions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from streams.errors import BadKey

_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,100}$")
# every topic name Kafka accepts (faust generates long ones: <agent>-<topic>-<Model>.<field>-repartition),
# and ':' as the other names here
_TOPIC = re.compile(r"^[A-Za-z0-9_.:\-]+$")
MAX_TOPIC_LENGTH = 249  # Kafka's limit
DEFAULT_PREFIX = "tw:"


def check_name(name: str, what: str = "name") -> str:
    """Names go inside hash tags: no braces, no spaces, at most 100 characters."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise BadKey(f"{what} {name!r} must match {_NAME.pattern}")
    return name


def check_topic(name: str) -> str:
    """Topic names: letters, digits, '.', '_', '-' (and ':'), at most 249 characters, as in Kafka."""
    if not isinstance(name, str) or not _TOPIC.match(name):
        raise BadKey(f"topic {name!r} must consist of letters, digits, '.', '_', '-' or ':'")
    if len(name) > MAX_TOPIC_LENGTH:
        raise BadKey(f"topic {name!r} has {len(name)} characters; at most {MAX_TOPIC_LENGTH} characters are accepted")
    return name


@dataclass(frozen=True, slots=True)
class Keys:
    """Key builder for one deployment; the prefix isolates deployments and tests."""

    prefix: str = DEFAULT_PREFIX

    # --- faust topics (dense offsets) -------------------------------------
    def topic_partition(self, topic: str, partition: int) -> str:
        return f"{self.prefix}t:{{{check_topic(topic)}.{int(partition)}}}"

    def topic_sequence(self, topic: str, partition: int) -> str:
        """Counter of the last dense offset handed out; same slot as its stream."""
        return f"{self.prefix}tseq:{{{check_topic(topic)}.{int(partition)}}}"

    def topic_generation(self, topic: str, partition: int) -> str:
        """Hash of a partition's generation (gen, start, replid): a new one begins when the
        partition's server changed under it (a replica promoted), at the offset it had then."""
        return f"{self.prefix}tgen:{{{check_topic(topic)}.{int(partition)}}}"

    def topic_compaction(self, topic: str, partition: int) -> str:
        """Hash record key -> offset of its latest entry, kept by the append script on a
        compacting topic's partition (same slot as its stream)."""
        return f"{self.prefix}ck:{{{check_topic(topic)}.{int(partition)}}}"

    def topic_meta(self, topic: str) -> str:
        """Hash of a topic's settings: partitions, retention."""
        return f"{self.prefix}tmeta:{{{check_topic(topic)}}}"

    def topics(self) -> str:
        return f"{self.prefix}topics"

    # --- consumer groups of the faust driver ------------------------------
    def group(self, group: str, part: str) -> str:
        """One of a group's keys (members, meta, joined, md, asg, owners, offsets, wake);
        all share the group's hash tag so one script can fence a commit against ownership."""
        return f"{self.prefix}g:{{{check_name(group, 'group')}}}:{part}"

    # --- per-strategy event streams (Redis time ids) ----------------------
    def events(self, strategy: str) -> str:
        return f"{self.prefix}ev:{{{check_name(strategy, 'strategy')}}}"

    def epoch(self, strategy: str) -> str:
        return f"{self.prefix}epoch:{{{check_name(strategy, 'strategy')}}}"

    def snapshot(self, strategy: str) -> str:
        return f"{self.prefix}snap:{{{check_name(strategy, 'strategy')}}}"

    def positions(self, strategy: str) -> str:
        """Hash tick-partition -> highest tick offset already turned into an event."""
        return f"{self.prefix}pos:{{{check_name(strategy, 'strategy')}}}"

    def gaps(self, strategy: str) -> str:
        """Stream of gap records: events trimmed past the hold ceiling before they were archived."""
        return f"{self.prefix}gaps:{{{check_name(strategy, 'strategy')}}}"

    def failovers(self, strategy: str) -> str:
        """Stream of failover records: the stream's last id when a replica took over; ids the
        old master acknowledged after it (and before the next append) are lost."""
        return f"{self.prefix}fo:{{{check_name(strategy, 'strategy')}}}"

    def strategies(self) -> str:
        return f"{self.prefix}strategies"

    # --- K-line bars (one slot per ticks partition: the agent appends a partition's bars at once) ---
    def kline(self, partition: int, ts_code: str) -> str:
        """One stock's 1-minute bars (Redis time ids: the public event ids), in its partition's slot."""
        return f"{self.prefix}kl:{{klines.{int(partition)}}}:{check_name(ts_code, 'ts_code')}"

    def kline_epoch(self, partition: int) -> str:
        return f"{self.prefix}klepoch:{{klines.{int(partition)}}}"

    def kline_codes(self, partition: int) -> str:
        """Set of the ts_codes with a bar stream in the partition (the archiver walks it)."""
        return f"{self.prefix}klcodes:{{klines.{int(partition)}}}"

    def kline_live(self, partition: int) -> str:
        """The partition's live partial bars, a short capped stream (no event ids to resume from)."""
        return f"{self.prefix}kllive:{{klines.{int(partition)}}}"

    def kline_archived(self, partition: int) -> str:
        """Hash ts_code -> id of the newest bar archived; trimming never passes it."""
        return f"{self.prefix}klarch:{{klines.{int(partition)}}}"

    # --- market breadth -------------------------------------------------
    def breadth_partials(self) -> str:
        """Hash ticks partition -> `<offset>\n<partial JSON>`: each partition's breadth partial,
        combined into the `market` stream (same hash tag as that stream)."""
        return f"{self.prefix}breadth:{{market}}"

    # --- dead letters -----------------------------------------------------
    def dead_letters(self, source: str) -> str:
        return f"{self.prefix}dlq:{{{check_name(source, 'source')}}}"
