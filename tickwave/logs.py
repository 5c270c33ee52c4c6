"""One structured line per notable event: logfmt (default) or JSON."""

from __future__ import annotations

import json
import logging
import sys
import time

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _RESERVED}


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [f"ts={ts}", f"level={record.levelname.lower()}", f"logger={record.name}",
                 f"msg={json.dumps(record.getMessage(), ensure_ascii=False)}"]
        for key, value in _fields(record).items():
            text = value if isinstance(value, (int, float)) else json.dumps(str(value), ensure_ascii=False)
            parts.append(f"{key}={text}")
        if record.exc_info:
            # unexpected errors only: expected bad input is logged without exc_info
            parts.append(f"exc={json.dumps(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": record.created, "level": record.levelname.lower(), "logger": record.name,
            "msg": record.getMessage(), **{k: str(v) for k, v in _fields(record).items()},
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def setup_logging(level: str = "INFO", fmt: str = "logfmt") -> None:
    """Configure the root logger once per process, on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiohttp.access", "asyncio", "faust", "mode", "pgserver"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
