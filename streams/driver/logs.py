"""One log line per notable driver event, with its facts as key=value in the text itself:
a faust worker's formatter prints only the message, not a record's extra fields."""

from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("tickwave.driver")
INFO, WARNING, ERROR = logging.INFO, logging.WARNING, logging.ERROR


def note(level: int, what: str, **facts: Any) -> None:
    """Log `what` followed by `key=value` for each fact (values with spaces quoted)."""
    if not log.isEnabledFor(level):
        return
    parts = [what]
    for key, value in facts.items():
        text = str(value)
        parts.append(f"{key}={text!r}" if (" " in text or not text) else f"{key}={text}")
    log.log(level, " ".join(parts))


class Streak:
    """Log a failure once when it starts and once when it ends, not on every retry;
    `failed` returns the backoff before the next try (0.05 s doubling each second, at most 2 s)."""

    def __init__(self, what: str):
        self.what = what
        self.since: float | None = None

    def failed(self, exc: Exception, **facts: Any) -> float:
        if self.since is None:
            self.since = time.monotonic()
            note(WARNING, f"{self.what} failing, retrying", error=str(exc), **facts)
        return min(2.0, 0.05 * 2 ** min(6, int(time.monotonic() - self.since)))

    def ok(self, **facts: Any) -> None:
        if self.since is not None:
            note(INFO, f"{self.what} recovered", after_s=round(time.monotonic() - self.since, 1), **facts)
            self.since = None
