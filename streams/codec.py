"""Stream entry codec: how records and events are laid out as Redis stream fields.

Topic records (dense-offset streams read by the faust driver and written by
ingest) are four fields, `k` key, `v` value, `h` headers, `t` wall-clock ms,
plus `c`, the codec version, and `n` = `v` when the value is None (a table
tombstone must not come back as b""). Event entries (per-strategy streams with Redis
time ids) are `e` the event JSON, `y` its type (`price`, `signal`, or `breadth` in the `market`
stream), `s` its schema version, `c`.
Decoding is the only place that looks at the version and applies upcasters.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from pydantic import ValidationError

from schemas.events import Breadth, PriceChange, SignalChange
from streams.errors import CorruptEntry

CODEC_VERSION = b"1"

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


RecordParts = tuple[bytes | None, bytes | None, Headers, int]

#: header the faust driver adds to a record of a partition generation > 0 ("<gen>:<start>"),
#: so an agent can hand the generation to the event fence (see streams/append_records.lua)
GENERATION_HEADER = "tw-generation"


def record_generation(fields: Fields) -> tuple[int, int]:
    """(generation, its first offset) of a topic entry: (0, 0) unless a failover started a new one."""
    raw = fields.get(b"g")
    if not raw:
        return 0, 0
    gen, _, start = raw.partition(b":")
    try:
        return int(gen), int(start)
    except ValueError:
        return 0, 0


def parse_generation(raw: bytes | str | None) -> tuple[int, int]:
    """The (generation, start) of a GENERATION_HEADER value; (0, 0) when absent or unreadable."""
    if not raw:
        return 0, 0
    text = raw.decode() if isinstance(raw, bytes) else raw
    gen, _, start = text.partition(":")
    return (int(gen), int(start)) if gen.isdigit() and start.isdigit() else (0, 0)


def decode_record_parts(fields: Fields) -> RecordParts:
    """(key, value, headers, timestamp ms) of one topic entry, or CorruptEntry with the reason.
    The one decoder of topic entries: `decode_record` and the faust driver's consumer use it."""
    version = fields.get(b"c")
    if version != CODEC_VERSION:
        raise CorruptEntry(f"unknown record codec version {version!r}")
    try:
        raw_headers = fields.get(b"h")
        return (
            fields[b"k"] or None,
            None if fields.get(b"n") == b"v" else fields[b"v"],
            decode_headers(raw_headers) if raw_headers else [],
            int(fields[b"t"]),
        )
    except KeyError as exc:
        raise CorruptEntry(f"missing field {exc.args[0]!r}") from None
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError and binascii.Error are ValueErrors
        raise CorruptEntry(f"undecodable field: {exc}") from None


def decode_record(entry_id: bytes | str, fields: Fields) -> Record:
    """Decode one topic entry, or raise CorruptEntry with the reason."""
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    try:
        key, value, headers, ts = decode_record_parts(fields)
    except CorruptEntry as exc:
        raise CorruptEntry(exc.reason, eid) from None
    return Record(key=key, value=value, headers=headers, timestamp_ms=ts, offset=id_to_offset(eid))


# --- events -----------------------------------------------------------------
EventType = Literal["price", "signal", "breadth"]
Event = PriceChange | SignalChange | Breadth
_EVENT_CLASSES: dict[bytes, type[PriceChange] | type[SignalChange] | type[Breadth]] = {
    b"price": PriceChange,
    b"signal": SignalChange,
    b"breadth": Breadth,
}

_VERSIONS = {cls: str(cls.SCHEMA_VERSION).encode() for cls in _EVENT_CLASSES.values()}

# (type, from_version) -> function turning a v(N) dict into a v(N+1) dict.
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
UPCASTERS: dict[tuple[bytes, int], Upcaster] = {}


def event_type(event: Event) -> bytes:
    if isinstance(event, PriceChange):
        return b"price"
    return b"breadth" if isinstance(event, Breadth) else b"signal"


def encode_event_parts(event: Event) -> tuple[bytes, bytes, bytes]:
    """(type, schema version, JSON body) of an event as stored; the event id is the entry id,
    so it is not in the body."""
    body = event.model_dump_json(exclude={"event_id"} if isinstance(event, PriceChange) else None)
    return event_type(event), _VERSIONS[type(event)], body.encode()


def encode_event(event: Event) -> dict[bytes, bytes]:
    """Fields of one event entry."""
    return event_fields(*encode_event_parts(event))


def event_fields(kind: bytes, schema_version: int | bytes, body: bytes) -> dict[bytes, bytes]:
    """Fields of an event entry from its parts (as the archive and the snapshot keep them)."""
    version = schema_version if isinstance(schema_version, bytes) else str(schema_version).encode()
    return {b"e": body, b"y": kind, b"s": version, b"c": CODEC_VERSION}


def event_parts(entry_id: bytes | str, fields: Fields) -> tuple[bytes, int, bytes]:
    """(type, schema version, JSON body) of an event entry, checked structurally, not decoded;
    raises CorruptEntry. For paths that move event bytes without reading them (the archive)."""
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    if fields.get(b"c") != CODEC_VERSION:
        raise CorruptEntry(f"unknown event codec version {fields.get(b'c')!r}", eid)
    kind = fields.get(b"y", b"")
    if kind not in _EVENT_CLASSES:
        raise CorruptEntry(f"unknown event type {kind!r}", eid)
    try:
        return kind, int(fields.get(b"s", b"1")), fields[b"e"]
    except (KeyError, ValueError) as exc:
        raise CorruptEntry(f"undecodable event: {exc!r}", eid) from None


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


class StoredEvent:
    """An event as stored: its public id and the event (a PriceChange carries the id too).

    Built from raw stream fields, it decodes on first access to `.event`: history
    and replay move thousands of events whose ids are all that is looked at on the way.
    Its accessors (`kind`, `schema_version`, `body`, `doc`) are how code outside the
    codec reads an entry, never the field letters.
    """

    __slots__ = ("id", "_fields", "_event")

    def __init__(self, id: str, event: Event | None = None, *, fields: dict[bytes, bytes] | None = None):
        if event is None and fields is None:
            raise TypeError("StoredEvent needs an event or its stream fields")
        self.id = id
        self._event = event
        self._fields = fields

    @property
    def event(self) -> Event:
        """The decoded event; raises CorruptEntry if the stored fields are unreadable."""
        if self._event is None:
            assert self._fields is not None
            self._event = decode_event(self.id, self._fields)
        return self._event

    @property
    def fields(self) -> dict[bytes, bytes]:
        """The stream fields as stored, or as the codec encodes the event."""
        if self._fields is None:
            self._fields = encode_event(self.event)
        return self._fields

    @property
    def kind(self) -> str:
        """"price", "signal" or "breadth"; KeyError for an entry without a type."""
        return self.fields[b"y"].decode()

    @property
    def is_price(self) -> bool:
        return self.fields.get(b"y") == b"price"

    @property
    def is_breadth(self) -> bool:
        return self.fields.get(b"y") == b"breadth"

    @property
    def schema_version(self) -> int:
        return int(self.fields.get(b"s", b"1"))

    @property
    def body(self) -> bytes:
        """The event's JSON as stored (without the event id); KeyError when missing."""
        return self.fields[b"e"]

    def doc(self) -> dict[str, Any]:
        """The JSON body parsed, not validated (ValueError when unreadable): the hot paths'
        view, where a full model decode would cost more than the work itself."""
        doc = orjson.loads(self.body)
        if not isinstance(doc, dict):
            raise ValueError("event body is not an object")
        return doc

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StoredEvent) and self.id == other.id and self.event == other.event

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"StoredEvent({self.id!r})"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def decode(entry_id: bytes | str, fields: dict[bytes, bytes]) -> StoredEvent:
    """One stream entry as a StoredEvent, decoded now; raises CorruptEntry."""
    eid = _text(entry_id)
    return StoredEvent(eid, decode_event(eid, fields), fields=fields)


def lazy(entry_id: bytes | str, fields: dict[bytes, bytes]) -> StoredEvent:
    """One stream entry as a StoredEvent decoded on first use."""
    return StoredEvent(_text(entry_id), fields=fields)


def parse_id(event_id: str) -> tuple[int, int]:
    """`ms-seq` as a sortable pair of integers; ValueError for anything else."""
    ms, sep, seq = event_id.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit():
        raise ValueError(f"not a stream id: {event_id!r}")
    return int(ms), int(seq)


MAX_SEQ = 2**63 - 1  # the largest sequence PostgreSQL's bigint holds; real ids stay far below


def id_after(event_id: str) -> str:
    """The smallest id greater than `event_id`."""
    ms, seq = parse_id(event_id)
    return f"{ms}-{seq + 1}"


def id_before(event_id: str) -> str:
    """The greatest id smaller than `event_id` (a bound, not necessarily an entry's id)."""
    ms, seq = parse_id(event_id)
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{MAX_SEQ}"
