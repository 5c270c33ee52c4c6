"""Stream entry codec: how records and events are laid out as Redis stream fields.

Topic records (dense-offset streams read by the faust driver and written by
ingest) are four fields, `k` key, `v` value, `h` headers, `t` wall-clock ms,
plus `c`, the codec version, and `n` = `v` when the value is None (a table
tombstone must not come back as b""). Event entries (per-strategy streams with Redis
time ids) are `e` the event JSON, `y` its type, `s` its schema version, `c`.
Decoding is the only place that looks at the version and applies upcasters.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from schemas.events import PriceChange, SignalChange
from streams.errors import CorruptEntry

CODEC_VERSION = b"1"
RECORD_FIELDS = (b"k", b"v", b"h", b"t", b"c")

Headers = list[tuple[str, bytes]]
Fields = Mapping[bytes, bytes]


# --- dense offsets ----------------------------------------------------------
# Redis refuses the id 0-0, so offset n lives at entry id 0-(n+1): offsets
# start at 0 like Kafka's.
def offset_to_id(offset: int) -> str:
    return f"0-{offset + 1}"


def id_to_offset(entry_id: bytes | str) -> int:
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = raw.partition("-")
    if ms != "0" or not seq.isdigit():
        raise CorruptEntry("not a dense-offset id", raw)
    return int(seq) - 1


@dataclass(frozen=True, slots=True)
class Record:
    """One message on a topic partition."""

    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp_ms: int
    offset: int = -1


def encode_headers(headers: Headers | Mapping[str, bytes] | None) -> bytes:
    if not headers:
        return b""
    items = headers.items() if isinstance(headers, Mapping) else headers
    return json.dumps(
        [[k, base64.b64encode(v if isinstance(v, bytes) else str(v).encode()).decode()] for k, v in items],
        separators=(",", ":"),
    ).encode()


def decode_headers(raw: bytes) -> Headers:
    if not raw:
        return []
    return [(str(k), base64.b64decode(v)) for k, v in json.loads(raw)]


EncodedRecord = tuple[bytes, bytes, bytes, bytes, bytes]


def encode_record(
    key: bytes | None,
    value: bytes | None,
    headers: Headers | Mapping[str, bytes] | None = None,
    timestamp_ms: int | None = None,
) -> EncodedRecord:
    """The values (k, v, h, t, n) the append script writes; an absent key is stored empty,
    an absent value is flagged in `n` so it reads back as None."""
    ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
    return (key or b"", value or b"", encode_headers(headers), str(ts).encode(), b"v" if value is None else b"")


def decode_record(entry_id: bytes | str, fields: Fields) -> Record:
    """Decode one topic entry, or raise CorruptEntry with the reason."""
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    version = fields.get(b"c")
    if version != CODEC_VERSION:
        raise CorruptEntry(f"unknown record codec version {version!r}", eid)
    try:
        key = fields[b"k"] or None
        value = None if fields.get(b"n") == b"v" else fields[b"v"]
        headers = decode_headers(fields.get(b"h", b""))
        ts = int(fields[b"t"])
    except KeyError as exc:
        raise CorruptEntry(f"missing field {exc.args[0]!r}", eid) from None
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise CorruptEntry(f"undecodable field: {exc}", eid) from None
    return Record(key=key, value=value, headers=headers, timestamp_ms=ts, offset=id_to_offset(eid))


# --- events -----------------------------------------------------------------
EventType = Literal["price", "signal"]
Event = PriceChange | SignalChange
_EVENT_CLASSES: dict[bytes, type[PriceChange] | type[SignalChange]] = {
    b"price": PriceChange,
    b"signal": SignalChange,
}

# (type, from_version) -> function turning a v(N) dict into a v(N+1) dict.
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
UPCASTERS: dict[tuple[bytes, int], Upcaster] = {}


def event_type(event: Event) -> bytes:
    return b"price" if isinstance(event, PriceChange) else b"signal"


def encode_event(event: Event) -> dict[bytes, bytes]:
    """Fields of one event entry; the event id is the entry id, so it is not stored."""
    body = event.model_dump_json(exclude={"event_id"} if isinstance(event, PriceChange) else None)
    return {
        b"e": body.encode(),
        b"y": event_type(event),
        b"s": str(type(event).SCHEMA_VERSION).encode(),
        b"c": CODEC_VERSION,
    }


def decode_event(entry_id: bytes | str, fields: Fields) -> Event:
    """Decode one event entry (upcasting old schema versions), or raise CorruptEntry."""
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    if fields.get(b"c") != CODEC_VERSION:
        raise CorruptEntry(f"unknown event codec version {fields.get(b'c')!r}", eid)
    kind = fields.get(b"y", b"")
    cls = _EVENT_CLASSES.get(kind)
    if cls is None:
        raise CorruptEntry(f"unknown event type {kind!r}", eid)
    try:
        version = int(fields.get(b"s", b"1"))
        if version == cls.SCHEMA_VERSION:
            # the hot path: one Rust-side parse, the id spliced in as the first key
            body = fields[b"e"]
            if cls is PriceChange and body.startswith(b"{"):
                body = b'{"event_id":"' + eid.encode() + b'",' + body[1:]
            return cls.model_validate_json(body)
        data = json.loads(fields[b"e"])
        while version < cls.SCHEMA_VERSION:
            data = UPCASTERS[(kind, version)](data)
            version += 1
        if version != cls.SCHEMA_VERSION:
            raise CorruptEntry(f"{kind.decode()} schema v{version} is newer than this reader", eid)
        if cls is PriceChange:
            data["event_id"] = eid
        return cls.model_validate(data)
    except CorruptEntry:
        raise
    except (KeyError, ValueError, TypeError, ValidationError) as exc:
        raise CorruptEntry(f"undecodable event: {str(exc).splitlines()[0]}", eid) from None
