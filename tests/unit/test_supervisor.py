"""The `serve --workers N` supervisor's bookkeeping, on fake processes (tests/integration/test_workers.py runs
real ones)."""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from integrations_service import supervisor
from integrations_service.config import load_settings


class FakeProcess:
    """A worker that serves until it is told to stop; `start` fails as a full pid table makes fork fail."""

    def __init__(self, fail: bool, pid: int) -> None:
        self._fail = fail
        self._read, self._write = os.pipe()
        self.sentinel = self._read
        self.pid: int | None = None
        self._pid = pid
        self.exitcode: int | None = None

    def start(self) -> None:
        if self._fail:
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        self.pid = self._pid

    def is_alive(self) -> bool:
        return self.pid is not None and self.exitcode is None

    def terminate(self) -> None:
        self.exitcode = 0
        os.close(self._write)  # the sentinel is readable once the process is gone

    kill = terminate

    def join(self, timeout: float | None = None) -> None:
        pass


class FakeContext:
    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.started: list[FakeProcess] = []

    def Process(self, **_: Any) -> FakeProcess:  # multiprocessing's name
        process = FakeProcess(fail=self.failures > 0, pid=1000 + len(self.started))
        self.failures -= 1
        self.started.append(process)
        return process


class FakeStop:
    def __init__(self) -> None:
        self.requested = False
        self.wake_read, self._wake_write = os.pipe()

    def request(self) -> None:
        self.requested = True
        os.write(self._wake_write, b"x")


def workers(context: FakeContext, tmp_path: Path) -> tuple[supervisor.Supervisor, FakeStop]:
    settings = load_settings(
        None,
        {
            "INTEGRATIONS_LISTEN_ADDRESS": "127.0.0.1:50051",
            "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/db",
            "INTEGRATIONS_WORKERS": "2",
            "INTEGRATIONS_METRICS_ADDRESS": "",
        },
    )
    stop = FakeStop()
    supervised = supervisor.Supervisor(settings, _never_called, str(tmp_path), stop)  # type: ignore[arg-type]
    supervised._context = context  # type: ignore[assignment]
    return supervised, stop


async def _never_called(_: Any) -> None:
    raise AssertionError("a fake process runs nothing")


def test_a_worker_that_cannot_even_be_started_is_retried_after_a_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    context = FakeContext(failures=2)  # both workers' first start fails: fork gets EAGAIN
    supervised, stop = workers(context, tmp_path)

    def stop_once_both_serve() -> None:
        deadline = time.monotonic() + 10
        while sum(process.is_alive() for process in context.started) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.request()

    threading.Thread(target=stop_once_both_serve, daemon=True).start()
    with caplog.at_level(logging.INFO, "integrations.supervisor"):
        assert supervised.run() == 0
    assert [p.exitcode for p in context.started if p.pid is not None] == [0, 0], "both retried, both stopped"
    failed = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "worker_died"]
    assert failed == [
        "worker 0 could not be started: [Errno 11] Resource temporarily unavailable: restarting it in 0.5 s",
        "worker 1 could not be started: [Errno 11] Resource temporarily unavailable: restarting it in 0.5 s",
    ]


def test_workers_already_started_are_stopped_when_the_supervisor_fails(tmp_path: Path) -> None:
    context = FakeContext(failures=0)
    supervised, _ = workers(context, tmp_path)

    def broken_watch() -> int | None:
        raise RuntimeError("a bug in the supervisor")

    supervised._watch = broken_watch  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        supervised.run()
    assert [process.exitcode for process in context.started] == [0, 0], "no worker left serving unsupervised"
