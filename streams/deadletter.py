"""Dead-letter streams: the raw entry, untouched, with the reason it was refused."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, cast

from streams.connection import AnyRedis
from streams.errors import translated
from streams.keys import Keys

DEAD_LETTER_MAXLEN = 100_000


def dead_letter_fields(
    reason: str, origin: str, raw: Mapping[bytes, bytes] | bytes
) -> dict[bytes, bytes]:
    """Fields of one dead letter: reason, origin, time, and the raw payload byte for byte."""
    fields = {
        b"reason": reason.encode(),
        b"origin": origin.encode(),
        b"at_ms": str(int(time.time() * 1000)).encode(),
    }
    if isinstance(raw, bytes):
        fields[b"raw"] = raw
    else:
        for name, value in raw.items():
            fields[b"raw." + (name if isinstance(name, bytes) else str(name).encode())] = value
    return fields


async def dead_letter(
    client: AnyRedis,
    keys: Keys,
    source: str,
    *,
    reason: str,
    origin: str,
    raw: Mapping[bytes, bytes] | bytes,
) -> bytes:
    """Append one refused entry to `tw:dlq:{source}`; returns its id."""
    key = keys.dead_letters(source)
    with translated(f"dead-letter to {key}"):
        entry_id = await client.xadd(
            key, cast(Any, dead_letter_fields(reason, origin, raw)), maxlen=DEAD_LETTER_MAXLEN, approximate=True
        )
    return entry_id if isinstance(entry_id, bytes) else str(entry_id).encode()


async def quarantine(
    client: AnyRedis,
    keys: Keys,
    source: str,
    stream_key: str,
    bad: list[tuple[tuple[bytes, dict[bytes, bytes]], Exception]],
) -> int:
    """Dead-letter entries that failed to decode, each with its reason; returns how many."""
    for (entry_id, fields), error in bad:
        eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
        reason = getattr(error, "reason", None) or str(error)
        await dead_letter(client, keys, source, reason=reason, origin=f"{stream_key}/{eid}", raw=fields)
    return len(bad)
