"""The log formats: nothing a request sends can forge a line, and every field the service logs is emitted."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import io
import json
import logging
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from integrations_service import logs

SERVICE_ROOT = Path(logs.__file__).parent
FORGED = "2026-12-01 08:00:00,000 INFO    integrations.audit: audit caller=spiffe://x/admin"


def record(message: str = "rpc finished", exc_info: bool = False, **extra: object) -> logging.LogRecord:
    made = logging.LogRecord("integrations.rpc", logging.INFO, __file__, 1, message, (), None)
    if exc_info:
        try:
            raise ValueError(f"bad\n{FORGED}")
        except ValueError:
            made.exc_info = sys.exc_info()
    made.__dict__.update(extra)
    return made


def extra_keys_logged_by_the_service() -> dict[str, str]:
    """Every constant key of an `extra={...}` argument in the service's code, with where it is."""
    found: dict[str, str] = {}
    for path in sorted(SERVICE_ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            fields = [keyword.value for keyword in node.keywords if keyword.arg == "extra"]
            if isinstance(node.func, ast.Name) and node.func.id == "log_line" and len(node.args) == 4:
                fields.append(node.args[3])  # log_line(logger, level, message, fields)
            for value in fields:
                assert isinstance(value, ast.Dict), f"{path}:{node.lineno}: extra must be a dict literal"
                for key in value.keys:
                    assert isinstance(key, ast.Constant), f"{path}:{node.lineno}: extra keys must be literals"
                    found.setdefault(str(key.value), f"{path.relative_to(SERVICE_ROOT)}:{node.lineno}")
    return found


def test_every_extra_field_the_service_logs_is_in_the_allowlist() -> None:
    found = extra_keys_logged_by_the_service()
    assert "versions" in found, "the scan finds the migration line's field"
    assert found["duration_ms"].startswith("api/interceptor.py"), "the scan finds the fields of log_line calls"
    missing = {key: where for key, where in found.items() if key not in logs._FIELDS}
    assert not missing, f"logged but silently dropped (add them to logs._FIELDS): {missing}"


@pytest.mark.parametrize("where", ["message", "field"])
def test_text_format_escapes_control_characters_so_no_line_can_be_forged(where: str) -> None:
    hostile = f"org\n{FORGED}\r\x1b[2K\u2028"
    made = record(hostile) if where == "message" else record(organization_id=hostile)
    line = logs.TextFormatter().format(made)
    assert "\n" not in line
    assert "\r" not in line
    assert "\x1b" not in line
    assert "\u2028" not in line
    assert "org\\x0a2026-12-01" in line


def test_text_format_keeps_tracebacks_but_indents_every_line_of_them() -> None:
    lines = logs.TextFormatter().format(record(exc_info=True)).split("\n")
    assert lines[0].endswith("rpc finished")
    assert "Traceback (most recent call last):" in lines[1]
    assert all(line.startswith("    ") for line in lines[1:])
    assert "ValueError: bad" in "\n".join(lines)


def test_json_format_stays_one_line() -> None:
    line = logs.JsonFormatter().format(record(f"m\n{FORGED}", organization_id="o\n"))
    assert "\n" not in line
    assert json.loads(line)["organization_id"] == "o\n"


def test_grpc_core_lines_are_wrapped_into_json() -> None:
    core = "E1201 08:41:46.583254    3482 ssl_transport_security.cc:2563] Handshake failed with error SSL_ERROR_SSL"
    entry = json.loads(logs.as_json_line(core))
    assert entry["logger"] == "grpc.core"
    assert entry["level"] == "error"
    assert entry["message"] == "Handshake failed with error SSL_ERROR_SSL"
    assert entry["source"] == "ssl_transport_security.cc:2563"
    assert json.loads(logs.as_json_line("Traceback (most recent call last):"))["logger"] == "stderr"
    already = '{"time": "t", "level": "info", "logger": "integrations.app", "message": "serving"}'
    assert logs.as_json_line(already) == already
    assert json.loads(logs.as_json_line("[1, 2]"))["message"] == "[1, 2]"


@pytest.mark.parametrize("created", [0.0, 1.0005, 1.9995, 1.9999996, 1764590000.123456, 1764590000.9996, 1764590001.0])
def test_json_time_is_what_isoformat_with_milliseconds_writes(created: float) -> None:
    made = record()
    made.created = created
    entry = json.loads(logs.JsonFormatter().format(made))
    assert entry["time"] == datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


def test_json_time_stays_right_across_seconds_on_one_formatter() -> None:
    formatter = logs.JsonFormatter()
    for created in (1764590000.999, 1764590001.0, 1764590000.5, 1764590002.25):
        made = record()
        made.created = created
        expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
        assert json.loads(formatter.format(made))["time"] == expected


def test_log_line_makes_the_record_logger_log_makes(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("integrations.rpc")
    fields: dict[str, object] = {"rpc": "/x.Y/Z", "code": "OK", "request_id": "r1", "organization_id": None}
    with caplog.at_level(logging.INFO, logger="integrations.rpc"):
        logger.info("rpc finished", extra=fields)
        logs.log_line(logger, logging.INFO, "rpc finished", fields)
    usual, lean = caplog.records
    assert set(vars(lean)) == set(vars(usual))
    # The moment differs, and the source: configure() makes logging look none up, the test's logging does.
    moments = {"created", "msecs", "relativeCreated", "pathname", "filename", "module", "lineno", "funcName"}
    assert {k: v for k, v in vars(lean).items() if k not in moments} == {
        k: v for k, v in vars(usual).items() if k not in moments
    }
    assert abs(lean.created - usual.created) < 1
    assert 0 <= lean.msecs < 1000
    assert abs(lean.relativeCreated - usual.relativeCreated) < 1000
    assert (lean.pathname, lean.lineno, lean.funcName) == ("(unknown file)", 0, "(unknown function)")

    def without_time(line: str) -> dict[str, object]:
        return {k: v for k, v in json.loads(line).items() if k != "time"}

    assert without_time(logs.JsonFormatter().format(lean)) == without_time(logs.JsonFormatter().format(usual))


def test_log_line_honours_levels_and_disabled_loggers(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("integrations.test_quiet")
    with caplog.at_level(logging.WARNING, logger="integrations.test_quiet"):
        logs.log_line(logger, logging.INFO, "below the level", {})
        logger.disabled = True
        try:
            logs.log_line(logger, logging.ERROR, "disabled", {})
        finally:
            logger.disabled = False
        logs.log_line(logger, logging.ERROR, "kept", {})
    assert [r.getMessage() for r in caplog.records] == ["kept"]


class _CountedWrites:
    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


async def test_lines_logged_in_one_loop_turn_are_written_with_one_write_at_its_end() -> None:
    target = _CountedWrites()
    lines = logs.LoopBatchedLines(target)  # type: ignore[arg-type]  # a TextIO for what the handler calls
    lines.write("a\n")
    lines.flush()
    lines.write("b\n")
    assert target.writes == []  # not before the turn ends
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert target.writes == ["a\nb\n"]
    lines.write("c\n")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert target.writes == ["a\nb\n", "c\n"]


async def test_a_line_logged_off_the_loop_is_written_at_once_after_what_is_pending() -> None:
    target = _CountedWrites()
    lines = logs.LoopBatchedLines(target)  # type: ignore[arg-type]
    lines.write("on the loop\n")
    await asyncio.to_thread(lines.write, "from a thread\n")
    assert target.writes == ["on the loop\n", "from a thread\n"]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert target.writes == ["on the loop\n", "from a thread\n"]  # nothing written twice


def test_pending_lines_are_written_at_exit_even_when_the_loop_never_turned_again() -> None:
    target = _CountedWrites()
    lines = logs.LoopBatchedLines(target)  # type: ignore[arg-type]

    async def log_and_stop() -> None:
        lines.write("last words\n")

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(log_and_stop())
    finally:
        loop.close()  # the scheduled drain may never run now
    lines.drain()  # what atexit calls
    assert "".join(target.writes) == "last words\n"


class _Text(str):
    pass


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "accents é and ✓ and 𝄞",
        'quote " backslash \\ newline \n nul \x00 line separator \u2028',
        0,
        -7,
        2**70,
        1.5,
        1e-7,
        1e22,
        float("nan"),
        float("inf"),
        True,
        False,
        ["stripe", "resend"],
        _Text("a str subclass"),
    ],
)
def test_a_json_line_is_exactly_what_json_dumps_writes(value: object) -> None:
    made = record(f"message with {value!r}\n", rpc=value, code="OK", organization_id=None, count=3)
    expected = {
        "time": logs._Timestamps()(made.created),
        "level": "info",
        "logger": "integrations.rpc",
        "message": made.getMessage(),
        "rpc": value,
        "code": "OK",
        "count": 3,
    }
    assert logs.JsonFormatter().format(made) == json.dumps(expected, ensure_ascii=False)


def test_a_json_line_with_a_traceback_is_exactly_what_json_dumps_writes() -> None:
    made = record(exc_info=True)
    formatter = logs.JsonFormatter()
    expected = {
        "time": logs._Timestamps()(made.created),
        "level": "info",
        "logger": "integrations.rpc",
        "message": "rpc finished",
        "exception": formatter.formatException(made.exc_info),  # type: ignore[arg-type]
    }
    assert formatter.format(made) == json.dumps(expected, ensure_ascii=False)


@contextlib.contextmanager
def _configured(monkeypatch: pytest.MonkeyPatch, worker: int | None = None) -> Iterator[io.StringIO]:
    """The service's JSON logging (`configure(True)`), writing to a string; the test's logging restored after."""
    written = io.StringIO()
    monkeypatch.setattr(logs, "_json_stream", lambda: written)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure(json_lines=True, worker=worker)
    try:
        yield written
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
        monkeypatch.setattr(logs, "_direct", None)


@pytest.fixture
def json_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    with _configured(monkeypatch) as written:
        yield written


WORKER = 3


@pytest.fixture
def worker_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """A worker's logging: `configure(True, worker=WORKER)`, as `serve --workers N` has it."""
    with _configured(monkeypatch, worker=WORKER) as written:
        yield written


def _lines(written: io.StringIO) -> list[dict[str, object]]:
    return [{k: v for k, v in json.loads(line).items() if k != "time"} for line in written.getvalue().splitlines()]


@contextlib.contextmanager
def _records_handled() -> Iterator[list[logging.LogRecord]]:
    """The records the service's handler handles meanwhile, with pytest's own root handlers out of the way."""
    root = logging.getLogger()
    ours, *pytest_handlers = root.handlers  # pytest adds its own to the root for each test's call
    handled: list[logging.LogRecord] = []
    handle = ours.handle

    def counted(record: logging.LogRecord) -> bool:
        handled.append(record)
        return handle(record)

    root.handlers[:] = [ours]
    ours.handle = counted  # type: ignore[method-assign]
    try:
        yield handled
    finally:
        del ours.handle
        root.handlers[:] = [ours, *pytest_handlers]


def _without_time(written: io.StringIO) -> list[str]:
    """The lines as written, but for their time (the two paths read the clock at different moments)."""
    return [re.sub(r'^\{"time": "[^"]*", ', "{", line) for line in written.getvalue().splitlines()]


def test_log_line_writes_to_the_configured_handler_the_line_a_record_would_make(json_logging: io.StringIO) -> None:
    logger = logging.getLogger("integrations.rpc")
    fields: dict[str, object] = {"rpc": "/x.Y/Z", "code": "OK", "duration_ms": 0.25, "organization_id": None}
    with _records_handled() as handled:
        logger.info("rpc finished", extra=fields)  # through a record and the handler
        logs.log_line(logger, logging.INFO, "rpc finished", fields)  # written directly
    assert len(handled) == 1  # the second line made no record
    usual, direct = _lines(json_logging)
    assert direct == usual
    assert usual == {"level": "info", "logger": "integrations.rpc", "message": "rpc finished", "rpc": "/x.Y/Z"} | {
        "code": "OK",
        "duration_ms": 0.25,
    }


def test_log_line_makes_a_record_again_when_anything_else_would_see_it(
    json_logging: io.StringIO, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("integrations.rpc")
    with caplog.at_level(logging.INFO, logger="integrations.rpc"):  # caplog's handler joins the root's
        logs.log_line(logger, logging.INFO, "seen by both", {"code": "OK"})
    assert [r.getMessage() for r in caplog.records] == ["seen by both"]
    assert [line["message"] for line in _lines(json_logging)] == ["seen by both"]  # and written once

    class Refuse(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return False

    # With pytest's own root handlers out of the way, which alone would keep log_line off its direct path.
    with _records_handled() as handled:
        handler = logging.getLogger().handlers[0]
        handler.addFilter(Refuse())
        try:
            logs.log_line(logger, logging.INFO, "filtered out", {})
        finally:
            handler.filters.clear()
        assert len(handled) == 1  # a record, which the filter refused
        logger.propagate = False
        try:
            logs.log_line(logger, logging.INFO, "not propagated", {})
        finally:
            logger.propagate = True
    assert [line["message"] for line in _lines(json_logging)] == ["seen by both"]


RPC_FIELDS: dict[str, object] = {
    "rpc": "/x.Y/Z",
    "code": "OK",
    "duration_ms": 0.25,
    "request_id": "r-1",
    "organization_id": "org_1",
    "provider": "stripe",
}


def test_a_workers_line_is_written_directly_byte_for_byte_as_its_record_would_write_it(
    worker_logging: io.StringIO,
) -> None:
    logger = logging.getLogger("integrations.rpc")
    with _records_handled() as handled:
        logger.info("rpc finished", extra=RPC_FIELDS)  # a record, which the worker's filter gives its field
        logs.log_line(logger, logging.INFO, "rpc finished", RPC_FIELDS)
        # A field of that name in `fields` is the worker's index all the same, as the filter sets it.
        logs.log_line(logger, logging.INFO, "rpc finished", {**RPC_FIELDS, "worker": "forged"})
    assert len(handled) == 1  # the other lines made no record
    usual, direct, forged = _without_time(worker_logging)
    assert direct == usual == forged
    assert usual.endswith(f'"provider": "stripe", "worker": {WORKER}}}')
    assert "worker" not in RPC_FIELDS  # the caller's fields are left as they were


def test_a_workers_log_line_makes_a_record_again_when_anything_else_would_see_it(worker_logging: io.StringIO) -> None:
    logger = logging.getLogger("integrations.rpc")
    handler = logging.getLogger().handlers[0]
    (field,) = handler.filters

    class Refuse(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return False

    refuse = Refuse()
    other = logging.NullHandler()
    with _records_handled() as handled:
        handler.addFilter(refuse)
        logs.log_line(logger, logging.INFO, "filtered out", {})
        handler.removeFilter(refuse)
        handler.removeFilter(field)  # no longer a worker's handler: no worker field
        logs.log_line(logger, logging.INFO, "not a worker's", {})
        handler.addFilter(field)
        logger.addHandler(other)
        logs.log_line(logger, logging.INFO, "seen by another handler", {})
        logger.removeHandler(other)
        logs.log_line(logger, logging.INFO, "direct again", {})
    assert [record.getMessage() for record in handled] == ["filtered out", "not a worker's", "seen by another handler"]
    assert [(line["message"], line.get("worker")) for line in _lines(worker_logging)] == [
        ("not a worker's", None),
        ("seen by another handler", WORKER),
        ("direct again", WORKER),
    ]
