"""Per-partition breadth partials in one Redis hash, each written only forward.

Every worker writes the partial of each ticks partition it owns; a partial replaces the
stored one only when its offset (the highest tick offset it includes) is not older, in the
script that writes it. So a worker that lost a partition (paused past its lease, or
still finishing a batch during a rebalance) cannot put back a stale figure over the new
owner's, and the new owner, recovering the table from its changelog, cannot put back an
older one either: the stored partial only ever moves forward through the partition's ticks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import orjson

from streams.connection import AnyRedis
from streams.errors import translated
from streams.keys import Keys

# KEYS[1] partials hash; ARGV: (partition, offset, body) triples. Stores `offset\nbody` when
# offset >= the stored one; returns how many were refused as older.
_PUT_LUA = """
local refused = 0
for i = 1, #ARGV, 3 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  local off = -1
  if cur then off = tonumber(string.match(cur, '^(%-?%d+)\\n')) or -1 end
  if tonumber(ARGV[i + 1]) >= off then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1] .. '\\n' .. ARGV[i + 2])
  else
    refused = refused + 1
  end
end
return refused
"""


class BreadthPartials:
    """Read and write the partials hash of one deployment."""

    def __init__(self, client: AnyRedis, keys: Keys):
        self.client, self.key = client, keys.breadth_partials()
        self._put = client.register_script(_PUT_LUA)

    async def put(self, parts: Mapping[int, Mapping[str, Any]]) -> int:
        """Write partials (partition -> partial with an `offset`); returns how many were refused."""
        if not parts:
            return 0
        args: list[Any] = []
        for p, part in parts.items():
            args += [str(p), str(int(part["offset"])), orjson.dumps(part)]
        with translated("write breadth partials"):
            return int(await self._put(keys=[self.key], args=args))

    async def read(self) -> dict[int, dict[str, Any]]:
        """Every partition's partial; an unreadable one is left out (its next write replaces it)."""
        with translated("read breadth partials"):
            raw = cast(dict[bytes, bytes], await self.client.hgetall(self.key))
        out = {}
        for p, value in raw.items():
            try:
                part = orjson.loads(value.split(b"\n", 1)[1])
                if isinstance(part, dict):
                    out[int(p)] = part
            except (IndexError, ValueError):
                continue
        return out
