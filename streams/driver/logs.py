"""One log line per notable driver event, with its facts as key=value in the text itself:
a faust worker's formatter prints only the message, not a record's extra fields."""

from __future__ import annotations

import logging
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
