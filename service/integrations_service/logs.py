"""Logging to stderr: one JSON object per line in production, readable lines in development.

Structured fields travel in the record's `extra`; only the names in
`_FIELDS` are emitted, so nothing reaches a log line by accident (a test
checks every `extra` key the service logs is listed).

Neither format lets a request forge a line: the text format escapes control
characters in the message and in every field (and indents tracebacks), JSON
escapes them by construction. In JSON mode even what other code writes to
file descriptor 2 (gRPC core's own messages, e.g. a refused TLS handshake)
comes out as JSON: see `_JsonStderr`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TextIO, cast

from integrations_service.untrusted import controls_escaped

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
    # How a worker process ended: the name of the signal that killed it (SIGKILL: an OOM kill).
    "signal",
    "store",
    "path",
    "mode",
    "caller",
    "outcome",
    "fields",
    "key_id",
    "count",
    "versions",
    "error",
    # Logged by code merged on main meanwhile (start-up warnings, rotate): the allowlist test found them.
    "variable",
    "legacy_remaining",
    "unreadable_rows",
    # A `rotate` run stopped by an outage: how far it got.
    "rows_scanned",
    "rows_rewrapped",
    # A WatchConfigChanges stream's scope (provider ids, bounded) when it opens.
    "providers",
)


def _fields(record: logging.LogRecord) -> dict[str, object]:
    attributes = record.__dict__  # where `extra` puts them
    return {name: value for name in _FIELDS if (value := attributes.get(name)) is not None}


# One encoder for every line: json.dumps with an option builds a new one per call.
_JSON = json.JSONEncoder(ensure_ascii=False)


class _Timestamps:
    """ISO 8601 UTC with milliseconds, as `datetime.isoformat(timespec="milliseconds")` writes it; the part up
    to the second is made once per second (a busy server logs many lines in each)."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        micros = round((created - second) * 1e6)  # as datetime.fromtimestamp rounds
        if micros >= 1_000_000:
            second, micros = second + 1, 0
        if second != self._second:
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = second
        return f"{self._prefix}.{micros // 1000:03d}+00:00"


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._time = _Timestamps()  # a handler formats one record at a time (it holds its lock)

    def format(self, record: logging.LogRecord) -> str:
        exception = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(record.created, record.levelname, record.name, record.getMessage(), record.__dict__, exception)

    def line(
        self,
        created: float,
        levelname: str,
        logger: str,
        message: str,
        attributes: Mapping[str, object],
        exception: str | None = None,
    ) -> str:
        """What `json.dumps({"time": …, "level": …, "logger": …, "message": …, **fields})` writes, made faster.

        A line is made of its parts: strings through the json module's own C escaper, numbers as json writes
        them, anything else through the encoder. A test checks it against json.dumps for every kind of value.
        """
        parts = [
            '{"time": "',
            self._time(created),
            '", "level": ',
            _string(levelname.lower()),
            ', "logger": ',
            _string(logger),
            ', "message": ',
            _string(message),
        ]
        for name in _FIELDS:
            value = attributes.get(name)
            if value is not None:
                parts += (', "', name, '": ', _value(value))
        if exception is not None:
            parts += (', "exception": ', _string(exception))
        parts.append("}")
        return "".join(parts)


_string = json.encoder.encode_basestring  # the C escaper, as json.dumps(ensure_ascii=False) uses


def _value(value: object) -> str:
    kind = value.__class__
    if kind is str:
        return _string(cast(str, value))
    if kind is int:
        return int.__repr__(cast(int, value))
    if kind is float and math.isfinite(cast(float, value)):
        return float.__repr__(cast(float, value))
    return _JSON.encode(value)  # bools, lists, NaN, subclasses: as json.dumps writes them


def _escaped(text: str) -> str:
    """`text` with control characters escaped, never cut: it stays on one line.

    Backslashes are left alone: request text reaches a log field through `untrusted.bounded`, which
    already made its own backslashes unambiguous, and doubling them here would show `\\x0a` for a newline.
    """
    return controls_escaped(text)


def _indented(block: str) -> str:
    """A traceback kept readable, but no line of it can pass for a log line of its own."""
    return "\n".join("    " + _escaped(line) for line in block.splitlines())


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = _escaped(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if fields := _fields(record):
            line += " " + " ".join(f"{k}={_escaped(str(v))}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + _indented(self.formatException(record.exc_info))
        if record.stack_info:
            line += "\n" + _indented(self.formatStack(record.stack_info))
        return line


# gRPC core's own log lines: "E1201 08:41:46.583254    3482 file.cc:2563] message".
_CORE_LINE = re.compile(r"([DIWEF])\d{4} [\d:.]+ +\d+ ([^\]]+)\] ?(.*)")
_CORE_LEVELS = {"D": "debug", "I": "info", "W": "warning", "E": "error", "F": "critical"}


def as_json_line(line: str) -> str:
    """`line` if it is a JSON object already; else the line wrapped in one (logger grpc.core for core's)."""
    with contextlib.suppress(ValueError):
        if isinstance(json.loads(line), dict):
            return line
    core = _CORE_LINE.fullmatch(line)
    entry = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "level": _CORE_LEVELS[core.group(1)] if core else "error",
        "logger": "grpc.core" if core else "stderr",
        "message": core.group(3) if core else line,
    }
    if core:
        entry["source"] = core.group(2)
    return json.dumps(entry, ensure_ascii=False)


class _JsonStderr:
    """File descriptor 2 becomes a pipe; a thread writes each line to the real stderr, as JSON.

    C code (gRPC core) writes to fd 2 directly, so wrapping `sys.stderr` is not enough. The
    service's own handler writes to the real stderr directly. At exit fd 2 is given back and
    the pipe drained, so nothing written before is lost.
    """

    def __init__(self) -> None:
        self._saved = os.dup(2)
        self.stream: TextIO = os.fdopen(
            os.dup(self._saved), "w", encoding="utf-8", errors="backslashreplace", buffering=1
        )
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(target=self._pump, args=(read_end,), name="stderr-json", daemon=True)
        self._thread.start()
        atexit.register(self.release)

    def _pump(self, read_end: int) -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for raw in pipe:
                line = raw.decode("utf-8", errors="backslashreplace").rstrip("\r\n")
                if line:
                    self._write((as_json_line(line) + "\n").encode())

    def _write(self, data: bytes) -> None:
        # Straight to the fd, one line at a time: the handler's stream flushes whole lines too, so they never mix.
        while data:
            data = data[os.write(self._saved, data) :]

    def release(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            sys.stderr.flush()
        os.dup2(self._saved, 2)  # closes the pipe's last write end: the pump reads to the end and stops
        self._thread.join(timeout=5)
        with contextlib.suppress(ValueError, OSError):
            self.stream.flush()


@functools.cache
def _json_stderr() -> _JsonStderr:
    """One per process: there is one fd 2."""
    return _JsonStderr()


def _json_stream() -> TextIO:
    try:
        return _json_stderr().stream
    except OSError:  # no usable fd 2 (closed): log to what Python has
        return sys.stderr


def log_line(logger: logging.Logger, level: int, message: str, fields: dict[str, object]) -> None:
    """`logger.log(level, message, extra=fields)` for the line a server logs on every call, made for less.

    `LogRecord.__init__` spends more than the formatter does (file and module names split from a path this
    configuration never records, a level name lookup, a mapping check of the arguments); this record has the
    same attributes, with those that name a source left as an unknown source has them. Handlers, levels,
    filters and disabled loggers apply as they do to `logger.log`.
    """
    if not logger.isEnabledFor(level):
        return
    direct = _direct
    if direct is not None and direct.is_the_only_handler_of(logger, level):
        direct.write(logger.name, level, message, fields)
        return
    record: logging.LogRecord = _bare_record(logging.LogRecord)
    attributes = record.__dict__
    attributes.update(_record_defaults(logger.name, level))
    created = time.time()
    attributes["created"] = created
    attributes["msecs"] = int((created - int(created)) * 1000) + 0.0
    attributes["relativeCreated"] = (created - _START) * 1000
    attributes["msg"] = message
    attributes.update(fields)
    logger.handle(record)


_bare_record = object.__new__


class _DirectLines:
    """The JSON handler `configure` installs, written to without a record while it is all a logger's records
    would reach: the same line, without the record and the handler's dispatch.

    A test (caplog), a filter or another handler added anywhere on the way makes `log_line` make a record
    again, as `logger.log` would. The one filter it knows is a worker's `WorkerField`, installed with the
    handler: it writes that field itself.
    """

    def __init__(
        self,
        handler: logging.StreamHandler[LoopBatchedLines],
        formatter: JsonFormatter,
        worker: WorkerField | None = None,
    ) -> None:
        self._handler = handler
        self._formatter = formatter
        self._stream = handler.stream
        # The handler's filters as `configure` left them: none, or a worker's field, which a line gets here too.
        self._filters: list[logging.Filter] = [worker] if worker is not None else []
        self._worker = worker

    def is_the_only_handler_of(self, logger: logging.Logger, level: int) -> bool:
        root = logging.root
        handlers = root.handlers
        if len(handlers) != 1 or handlers[0] is not self._handler or root.filters:
            return False
        handler = self._handler
        if handler.filters != self._filters or level < handler.level or handler.stream is not self._stream:
            return False
        if handler.formatter is not self._formatter:
            return False
        current: logging.Logger | None = logger
        while current is not None and current is not root:
            if current.handlers or current.filters or not current.propagate:
                return False
            current = current.parent
        return current is root

    def write(self, name: str, level: int, message: str, fields: Mapping[str, object]) -> None:
        worker = self._worker
        if worker is not None:  # what its filter does to a record: the field set, whatever `fields` had
            fields = {**fields, "worker": worker.index}
        self._handler.acquire()  # the formatter's clock is not thread-safe: as Handler.handle does
        try:
            line = self._formatter.line(time.time(), logging.getLevelName(level), name, message, fields)
            self._stream.write(line + "\n")
        finally:
            self._handler.release()


class WorkerField(logging.Filter):
    """Adds `worker=<index>` to every log line of a worker of `serve --workers N`, so interleaved lines can be
    told apart (`configure(worker=…)` installs it)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


_direct: _DirectLines | None = None
_batched: LoopBatchedLines | None = None


def drain() -> None:
    """Write the lines still pending now: for an exit that skips atexit (a multiprocessing worker's)."""
    if _batched is not None:
        _batched.drain()


_START: float = logging._startTime  # type: ignore[attr-defined]  # what LogRecord counts relativeCreated from


@functools.cache
def _record_defaults(name: str, level: int) -> dict[str, object]:
    """What `LogRecord` sets from its arguments when none name a source (`configure` records none)."""
    made = logging.LogRecord(name, level, "(unknown file)", 0, "", (), None, "(unknown function)")
    variable = ("created", "msecs", "relativeCreated", "msg")
    return {key: value for key, value in made.__dict__.items() if key not in variable}


class LoopBatchedLines:
    """A log stream that writes the lines logged during one event-loop iteration with one write.

    A busy server logs a line per call. Written one at a time, each line is a write(2) that lets go of the
    GIL, and the loop then waits for gRPC's poller thread to hand it back: that cost more than formatting
    the line. Lines logged on a running loop are kept until the end of the iteration (`loop.call_soon`);
    lines logged anywhere else (another thread, before or after the loop) are written at once, after
    whatever is pending. So a line is at most one iteration late, lines keep their order, and whatever is
    pending at exit is written then; a process killed outright loses at most the lines of the iteration
    it was in.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._pending: list[str] = []
        self._scheduled = False
        atexit.register(self.drain)

    def write(self, text: str) -> int:
        loop = asyncio._get_running_loop()  # the C accessor: None off the loop's thread, never raises
        if loop is None:
            self.drain()
            self._write(text)
        else:
            self._pending.append(text)
            if not self._scheduled:
                self._scheduled = True
                loop.call_soon(self.drain)
        return len(text)

    def flush(self) -> None:
        """Called by the handler after each line: the batch is written by `drain`, at the end of the iteration."""

    def fileno(self) -> int:
        """The descriptor the lines end up on (the supervisor hands it to its workers as their fd 2)."""
        return self._stream.fileno()

    def drain(self) -> None:
        self._scheduled = False
        if self._pending:
            lines, self._pending = self._pending, []
            self._write("".join(lines))

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: there is nowhere left to say so
            pass


def configure(json_lines: bool, level: int = logging.INFO, *, worker: int | None = None) -> None:
    """`worker`: the index of a worker of `serve --workers N`, which every line of it then names."""
    global _direct, _batched  # what this function installs: log_line and drain use them
    _batched = LoopBatchedLines(_json_stream() if json_lines else sys.stderr)
    handler = logging.StreamHandler(_batched)
    formatter = JsonFormatter() if json_lines else TextFormatter()
    handler.setFormatter(formatter)
    field = WorkerField(worker) if worker is not None else None
    if field is not None:
        handler.addFilter(field)
    _direct = _DirectLines(handler, formatter, field) if isinstance(formatter, JsonFormatter) else None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # No line shows the source file, thread or process of a call (the logging HOWTO's "Optimization"):
    # finding them costs a stack walk and three lookups per line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # These log every bound query parameter at DEBUG: ciphertexts, organization ids.
    for chatty in ("aiosqlite", "asyncpg"):
        logging.getLogger(chatty).setLevel(max(level, logging.INFO))
