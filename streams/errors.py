"""The streams package's error root. Redis and asyncpg errors are translated here and
nowhere else: code elsewhere branches on these classes, never on a reply's text."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import redis.exceptions as rex


class StreamsError(Exception):
    """Root of every error the streams layer raises."""


class StreamUnavailable(StreamsError):
    """Redis could not be reached or dropped the connection; retry with backoff."""


class CommandError(StreamsError):
    """Redis refused a command (a reply error no other class here names)."""


class NoGroup(CommandError):
    """The consumer group or its stream is gone: the stream was deleted and recreated."""


class GroupExists(CommandError):
    """XGROUP CREATE found the group already there."""


class ScriptMissing(CommandError):
    """EVALSHA of a script Redis no longer caches (it restarted); nothing was run."""


class OffsetConflict(CommandError):
    """A conditional append found its partition at another offset than expected; nothing was
    written. Another writer got there first, or an earlier try of the same append landed."""


class CorruptEntry(StreamsError):
    """A stream entry that the codec cannot decode; it belongs in the dead-letter stream."""

    def __init__(self, reason: str, entry_id: str | None = None):
        super().__init__(reason if entry_id is None else f"{entry_id}: {reason}")
        self.reason = reason
        self.entry_id = entry_id


class BadKey(StreamsError, ValueError):
    """A name that cannot be used inside a key (empty, too long, or holding braces)."""


class ArchiveUnavailable(StreamsError):
    """PostgreSQL could not be reached or dropped the connection; retry with backoff."""


class MigrationError(StreamsError):
    """A migration failed; the schema is left as it was before the run."""


class SignalNotFound(StreamsError, LookupError):
    """A remove of a signal the strategy's list does not hold; nothing was written."""


class BadSignals(StreamsError, ValueError):
    """Signals that cannot be stored (an import file's bad rows, each named); nothing was written."""


_UNAVAILABLE_REPLIES = ("LOADING", "BUSY ", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN")


def translate(exc: BaseException, action: str) -> BaseException:
    """The streams error for a redis-py exception (the exception itself when it is not Redis's)."""
    if isinstance(exc, StreamsError):
        return exc
    if isinstance(exc, (rex.ConnectionError, rex.TimeoutError, ConnectionError, OSError)):
        return StreamUnavailable(f"{action}: {exc}")
    if isinstance(exc, rex.NoScriptError):
        return ScriptMissing(f"{action}: {exc}")
    if isinstance(exc, rex.ResponseError):
        text = str(exc)
        if text.startswith(_UNAVAILABLE_REPLIES):
            return StreamUnavailable(f"{action}: {exc}")
        # Redis 7 ends a blocked XREADGROUP with UNBLOCKED when its stream is deleted: the
        # group went with it, as NOGROUP says on the next read
        if text.startswith("NOGROUP") or (text.startswith("UNBLOCKED") and "no longer exists" in text):
            return NoGroup(f"{action}: {exc}")
        if text.startswith("BUSYGROUP"):
            return GroupExists(f"{action}: {exc}")
        if text.startswith("OFFSETCONFLICT"):
            return OffsetConflict(f"{action}: {exc}")
        return CommandError(f"{action}: {exc}")
    return exc


@contextmanager
def translated(action: str) -> Iterator[None]:
    """Re-raise redis-py's errors as the streams errors above, naming the action."""
    try:
        yield
    except (rex.RedisError, ConnectionError, OSError) as exc:
        mapped = translate(exc, action)
        if mapped is exc:
            raise
        raise mapped from exc


@contextmanager
def pg_translated(action: str) -> Iterator[None]:
    """Connection-level asyncpg and OS errors become ArchiveUnavailable (a backend terminated
    by an administrator or a server shutdown says so first, as AdminShutdown or CrashShutdown)."""
    try:
        yield
    except (OSError, asyncpg.exceptions.PostgresConnectionError, asyncpg.exceptions.CannotConnectNowError,
            asyncpg.exceptions.AdminShutdownError, asyncpg.exceptions.CrashShutdownError,
            asyncpg.exceptions.InterfaceError) as exc:
        raise ArchiveUnavailable(f"{action}: {exc}") from exc
