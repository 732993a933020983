"""Logging to stderr: one JSON object per line in production, readable lines in development.

Structured fields travel in the record's `extra`; only the names in
`_FIELDS` are emitted, so nothing reaches a log line by accident.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_FIELDS = (
    "rpc",
    "code",
    "duration_ms",
    "request_id",
    "organization_id",
    "provider",
    "event",
    "address",
    # A worker of `serve --workers N` (its index), and the processes the supervisor starts.
    "worker",
    "pid",
    "store",
    "path",
    "mode",
    "caller",
    "outcome",
    "fields",
    "key_id",
    "count",
)


def _fields(record: logging.LogRecord) -> dict[str, object]:
    return {name: value for name in _FIELDS if (value := getattr(record, name, None)) is not None}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if fields := _fields(record):
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def configure(json_lines: bool, level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # These log every bound query parameter at DEBUG: ciphertexts, organization ids.
    for chatty in ("aiosqlite", "asyncpg"):
        logging.getLogger(chatty).setLevel(max(level, logging.INFO))
