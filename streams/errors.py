"""The streams package's error root; Redis errors are translated here and nowhere else."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis.exceptions as rex


class StreamsError(Exception):
    """Root of every error the streams layer raises."""


class StreamUnavailable(StreamsError):
    """Redis could not be reached or dropped the connection; retry with backoff."""


class CorruptEntry(StreamsError):
    """A stream entry that the codec cannot decode; it belongs in the dead-letter stream."""

    def __init__(self, reason: str, entry_id: str | None = None):
        super().__init__(reason if entry_id is None else f"{entry_id}: {reason}")
        self.reason = reason
        self.entry_id = entry_id


class BadKey(StreamsError, ValueError):
    """A name that cannot be used inside a key (empty, too long, or holding braces)."""


@contextmanager
def translated(action: str) -> Iterator[None]:
    """Re-raise redis-py's connection errors as StreamUnavailable naming the action."""
    try:
        yield
    except (rex.ConnectionError, rex.TimeoutError, ConnectionError, OSError) as exc:
        raise StreamUnavailable(f"{action}: {exc}") from exc
    except rex.ResponseError as exc:
        if str(exc).startswith(("LOADING", "BUSY ", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN")):
            raise StreamUnavailable(f"{action}: {exc}") from exc
        raise
