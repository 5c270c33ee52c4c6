"""A consumer group in Redis: leased membership, rebalance rounds, fenced commits.

All of it is one Lua script (group.lua) over the group's hash-tagged keys, so
each step is atomic and a commit is checked against partition ownership in the
same call that writes it. This module only calls the script and shapes replies;
the protocol (when to revoke, join, lead) lives in the consumer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any, cast

from faust.types import TP

from streams.connection import AnyRedis
from streams.errors import translated
from streams.keys import Keys

_GROUP_LUA = files("streams.driver").joinpath("group.lua").read_text()
_PARTS = ("members", "meta", "joined", "md", "asg", "owners", "offsets", "wake")


def tp_field(tp: TP) -> str:
    """A partition as a hash field; `|` cannot occur in a topic name (streams.keys.check_topic)."""
    return f"{tp.topic}|{tp.partition}"


def field_tp(raw: bytes | str) -> TP:
    text = raw.decode() if isinstance(raw, bytes) else raw
    topic, _, partition = text.rpartition("|")
    return TP(topic, int(partition))


@dataclass(frozen=True, slots=True)
class Reply:
    """What the group said: status, the current round and generation, and any payload."""

    status: str
    round: int
    generation: int
    payload: list[Any] = field(default_factory=list)


class Group:
    """One member's handle on its group in Redis."""

    def __init__(self, client: AnyRedis, keys: Keys, group: str, member: str, *,
                 lease_ms: int, rebalance_ms: int):
        self.client = client
        self.group = group
        self.member = member
        self.lease_ms = lease_ms
        self.rebalance_ms = rebalance_ms
        self.keys = [keys.group(group, part) for part in _PARTS]
        self.wake_key = self.keys[-1]
        self._script = client.register_script(_GROUP_LUA)

    async def _call(self, op: str, *args: Any) -> Any:
        with translated(f"group {self.group} {op}"):
            return await self._script(keys=self.keys, args=[op, self.member, self.lease_ms, *args])

    async def _reply(self, op: str, *args: Any) -> Reply:
        raw = await self._call(op, *args)
        status = raw[0].decode() if isinstance(raw[0], bytes) else str(raw[0])
        return Reply(status, int(raw[1]), int(raw[2]), list(raw[3:]))

    async def heartbeat(self) -> Reply:
        """Renew the lease; `evicted` when it already ran out."""
        return await self._reply("heartbeat")

    async def join(self, metadata: bytes, *, changed: bool) -> Reply:
        """Join the current round (starting one when new here or `changed`)."""
        return await self._reply("join", metadata, "1" if changed else "0", self.rebalance_ms)

    async def sync(self, round: int) -> Reply:
        """`wait`, `again` (a newer round), `evicted`, `lead` with every member's metadata,
        or `assigned` with this member's assignment."""
        return await self._reply("sync", round)

    async def assign(self, round: int, assignments: Mapping[str, bytes], owners: Mapping[TP, str]) -> Reply:
        """Write the leader's assignment as the next generation; `stale` when the round moved on."""
        args: list[Any] = [round, len(assignments)]
        for member, data in assignments.items():
            args += [member, data]
        for tp, owner in owners.items():
            args += [tp_field(tp), owner]
        return await self._reply("assign", *args)

    async def commit(self, generation: int, offsets: Mapping[TP, int],
                     partition_gens: Mapping[TP, int] | None = None) -> set[TP]:
        """Commit offsets this member owns in `generation`; returns the partitions refused.
        An offset read in a partition generation > 0 is stored as "<offset>@<gen>", so whoever
        resumes from it after another failover knows which generation it belongs to."""
        args: list[Any] = [generation]
        gens = partition_gens or {}
        for tp, offset in offsets.items():
            gen = gens.get(tp, 0)
            args += [tp_field(tp), f"{int(offset)}@{gen}" if gen else int(offset)]
        refused = await self._call("commit", *args)
        return {field_tp(r) for r in refused or []}

    async def leave(self) -> Reply:
        """Leave at once, so the others take over without waiting for the lease."""
        return await self._reply("leave")

    async def committed(self, tps: Iterable[TP]) -> dict[TP, int | None]:
        """The committed offset (next to read) of each partition, None where there is none."""
        return {tp: (c[0] if c else None) for tp, c in (await self.committed_with_gens(tps)).items()}

    async def committed_with_gens(self, tps: Iterable[TP]) -> dict[TP, tuple[int, int] | None]:
        """The committed (offset, partition generation) of each partition, None where there is none."""
        tps = list(tps)
        if not tps:
            return {}
        with translated(f"group {self.group} offsets"):
            values = await self.client.hmget(self.keys[6], [tp_field(tp) for tp in tps])
        out: dict[TP, tuple[int, int] | None] = {}
        for tp, v in zip(tps, values):
            if v is None:
                out[tp] = None
                continue
            offset, _, gen = (v.decode() if isinstance(v, bytes) else str(v)).partition("@")
            out[tp] = (int(offset), int(gen or 0))
        return out

    async def last_wake(self) -> bytes:
        """Id of the newest wake-up entry (start point for `wait`)."""
        with translated(f"group {self.group} wake"):
            last = await self.client.xrevrange(self.wake_key, count=1)
        return cast(bytes, last[0][0]) if last else b"0-0"

    async def wait(self, after: bytes, timeout_ms: int) -> bytes:
        """Block until the group changes (a new round or generation) or `timeout_ms` passes."""
        with translated(f"group {self.group} wait"):
            reply = cast(list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]], await self.client.xread(
                {self.wake_key: after}, count=100, block=max(1, timeout_ms)))
        for _key, entries in reply or []:
            if entries:
                return cast(bytes, entries[-1][0])
        return after
