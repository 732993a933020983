"""`serve --workers N`: N server processes on one port, under this supervisor.

The supervisor migrates the store and checks the keys once, then starts the
workers. Each worker is a whole server (its own pool, health, graceful stop)
binding the same address: gRPC sets SO_REUSEPORT, so the kernel spreads the
incoming connections over them. The supervisor itself serves no gRPC; it
serves the one /metrics endpoint, adding up the workers' series from
prometheus_client's multiprocess files. SIGTERM or SIGINT drains every worker;
a worker that dies otherwise is restarted after a backoff, and a crash loop
ends the service.

Workers are spawned, not forked: a forked child of a process that has run
gRPC or asyncio inherits their threads' locks half-held. The settings,
keyring included, reach a worker through the spawn pipe, never through its
environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any

from integrations_service import app, logs, metrics
from integrations_service.config import Settings
from integrations_service.errors import ConfigurationError, Unavailable

log = logging.getLogger("integrations.supervisor")

Serve = Callable[[Settings], Coroutine[Any, Any, None]]

# A worker that lived this long was not crash-looping: its next death starts the backoff again.
STABLE_SECONDS = 30.0
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 10.0
# More deaths than this within RESTART_WINDOW seconds end the service.
RESTART_BUDGET = 5
RESTART_WINDOW = 60.0
ORPHAN_CHECK_SECONDS = 1.0
# Beyond the shutdown grace the workers get to close their stores and flush audit records.
STOP_MARGIN = 10.0


def run(settings: Settings, serve: Serve) -> int:
    """Supervise `settings.workers` processes each running `serve(settings)`; the service's exit code.

    ConfigurationError and Unavailable (a setting, file or store that stops the start) reach the caller.
    """
    # From before the migrations: as PID 1 of a container, a signal without a handler is not even delivered.
    stop = _StopRequest()
    if not asyncio.run(_prepare(settings, stop)):
        log.info("stopped before any worker started", extra={"event": "stopped"})
        return stop.done(0)
    metrics_dir = tempfile.mkdtemp(prefix="integrations-metrics-")
    # Read by prometheus_client when a worker imports it: every worker writes its series there.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        supervisor = Supervisor(settings, serve, metrics_dir, stop)
        return stop.done(supervisor.run())
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


class _StopRequest:
    """SIGTERM and SIGINT, from the supervisor's start to its exit: noted, and a byte on a pipe to wake its wait."""

    def __init__(self) -> None:
        self.requested = False
        self.wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.requested = True
        with contextlib.suppress(BlockingIOError):  # a full pipe already wakes the supervisor
            os.write(self._wake_write, b"x")

    def done(self, code: int) -> int:
        """The exit code, once every worker has stopped: a signal from now on (a second SIGTERM, Ctrl-C twice)
        is ignored, where Python's exit, which sets the handlers back to the default, would die of it."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        return code


async def _prepare(settings: Settings, stop: _StopRequest) -> bool:
    """Once, before any worker: bad TLS files, policy or keys stop the service here, and migrations run alone.

    False when a signal ended it (a wait for the store, for another replica's migrations): what it opened is
    closed, and no worker is to start.
    """
    loop = asyncio.get_running_loop()
    preparing = asyncio.current_task()
    assert preparing is not None

    def cancel() -> None:
        loop.remove_reader(stop.wake_read)  # once: closing the store must not be cancelled again
        preparing.cancel()

    loop.add_reader(stop.wake_read, cancel)
    try:
        if stop.requested:
            return False
        app.check_security_files(settings)
        async with app.maintenance(settings, pool_size=1):
            pass  # opening migrates and checks the keys; closing saves nothing new
    except asyncio.CancelledError:
        if stop.requested:
            return False
        raise
    finally:
        loop.remove_reader(stop.wake_read)
    log.info("migrations applied and keys checked", extra={"event": "migrated"})
    return not stop.requested


@dataclass
class _Slot:
    index: int
    process: BaseProcess | None = None
    started: float = 0.0
    backoff: float = FIRST_BACKOFF
    restart_at: float | None = None
    deaths: list[float] = field(default_factory=list)


class Supervisor:
    def __init__(self, settings: Settings, serve: Serve, metrics_dir: str, stop: _StopRequest) -> None:
        self._settings = settings
        # The supervisor serves the metrics of all; a worker opens no metrics port of its own.
        self._worker_settings = dataclasses.replace(settings, metrics_address=None)
        self._serve = serve
        self._metrics_files = MetricsFiles(metrics_dir)
        self._slots = [_Slot(index) for index in range(settings.workers)]
        self._context = multiprocessing.get_context("spawn")
        self._stop = stop
        self._restarts: Any = None

    def run(self) -> int:
        self._serve_metrics()
        try:
            for slot in self._slots:
                if self._start(slot):
                    return 1
            log.info(
                "supervising %d workers",
                len(self._slots),
                extra={"event": "supervising", "count": len(self._slots), "address": self._settings.listen_address},
            )
            code = self._watch()
        except BaseException:
            # Whatever went wrong here, the workers must not go on serving unsupervised (nor this process hang in
            # multiprocessing's exit, which joins them).
            self._stop_all()
            raise
        return self._stop_all() if code is None else code

    def _serve_metrics(self) -> None:
        if self._settings.metrics_address is None:
            return
        from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, start_http_server

        disable_created_metrics()  # type: ignore[no-untyped-call]
        registry = CollectorRegistry()
        registry.register(self._metrics_files)
        # prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set: this one is the supervisor's own.
        self._restarts = Counter(
            "integrations_worker_restarts",
            "Workers restarted after dying unexpectedly, by worker",
            ["worker"],
            registry=registry,
        )
        for slot in self._slots:
            self._restarts.labels(str(slot.index))
        host, _, port = self._settings.metrics_address.rpartition(":")
        try:
            start_http_server(int(port), addr=host.strip("[]"), registry=registry)
        except OSError as error:
            raise ConfigurationError(
                f"INTEGRATIONS_METRICS_ADDRESS: cannot listen on {self._settings.metrics_address}: {error.strerror}"
            ) from None

    def _start(self, slot: _Slot) -> bool:
        """Start the worker of `slot`; True when it could not be, and its restart budget is spent."""
        process = self._context.Process(
            target=_worker_main,
            args=(self._worker_settings, slot.index, self._serve, os.getpid()),
            name=f"integrations-worker-{slot.index}",
            daemon=False,
        )
        slot.started = time.monotonic()  # the attempt's, for the backoff of one that fails at once
        try:
            with _log_stream_as_stderr():
                process.start()
        except OSError as error:  # no process to be had (the pod's pid limit, memory): as a worker that died at once
            slot.process, slot.restart_at = None, None
            return self._restart_later(slot, f"could not be started: {error}", None, None, None)
        slot.process, slot.restart_at = process, None
        log.info(
            "worker %d started (pid %s)",
            slot.index,
            process.pid,
            extra={"event": "worker_started", "worker": slot.index, "pid": process.pid},
        )
        return False

    def _watch(self) -> int | None:
        """Until a signal (None) or a crash loop (the exit code)."""
        while not self._stop.requested:
            now = time.monotonic()
            for slot in self._slots:
                if slot.restart_at is not None and slot.restart_at <= now and self._start(slot):
                    return 1
            due = [slot.restart_at for slot in self._slots if slot.restart_at is not None]
            timeout = max(0.0, min(due) - now) if due else None
            sentinels: list[Any] = [
                slot.process.sentinel for slot in self._slots if slot.process is not None and slot.restart_at is None
            ]
            multiprocessing.connection.wait([*sentinels, self._stop.wake_read], timeout)
            if self._stop.requested:
                return None
            for slot in self._slots:
                if (
                    slot.process is not None
                    and slot.restart_at is None
                    and not slot.process.is_alive()
                    and self._died(slot)
                ):
                    return 1
        return None

    def _died(self, slot: _Slot) -> bool:
        """Schedule the restart of a worker that died on its own; True when its restart budget is spent."""
        assert slot.process is not None
        code = slot.process.exitcode
        ended, signame = _ending(code)
        self._forget(slot.process)
        return self._restart_later(slot, f"died unexpectedly ({ended})", slot.process.pid, code, signame)

    def _restart_later(self, slot: _Slot, what: str, pid: int | None, code: int | None, signame: str | None) -> bool:
        """Log `what` happened to the worker of `slot` and schedule its restart; True when its budget is spent."""
        now = time.monotonic()
        if now - slot.started >= STABLE_SECONDS:
            slot.backoff = FIRST_BACKOFF
        slot.deaths = [t for t in slot.deaths if now - t < RESTART_WINDOW] + [now]
        if len(slot.deaths) > RESTART_BUDGET:
            log.error(
                "worker %d died %d times within %.0f s (last: %s): stopping the service; its log lines above say why",
                slot.index,
                len(slot.deaths),
                RESTART_WINDOW,
                what,
                extra={"event": "workers_crash_loop", "worker": slot.index, "code": code, "signal": signame},
            )
            self._stop_all()
            return True
        log.error(
            "worker %d%s %s: restarting it in %.1f s",
            slot.index,
            "" if pid is None else f" (pid {pid})",
            what,
            slot.backoff,
            extra={"event": "worker_died", "worker": slot.index, "pid": pid, "code": code, "signal": signame},
        )
        if self._restarts is not None:
            self._restarts.labels(str(slot.index)).inc()
        slot.restart_at = now + slot.backoff
        slot.backoff = min(slot.backoff * 2, MAX_BACKOFF)
        return False

    def _forget(self, process: BaseProcess) -> None:
        if process.pid is not None:
            self._metrics_files.forget(process.pid)

    def _stop_all(self) -> int:
        """SIGTERM to every worker, each drains; 0 when every one of them stopped cleanly."""
        running = [slot for slot in self._slots if slot.process is not None and slot.process.is_alive()]
        log.info("stopping %d workers", len(running), extra={"event": "shutting_down", "count": len(running)})
        for slot in running:
            assert slot.process is not None
            slot.process.terminate()  # SIGTERM
        deadline = time.monotonic() + self._settings.shutdown_grace + STOP_MARGIN
        clean = True
        for slot in running:
            assert slot.process is not None
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                log.error(
                    "worker %d did not stop in time: killed",
                    slot.index,
                    extra={"event": "worker_killed", "worker": slot.index, "pid": slot.process.pid},
                )
                slot.process.kill()
                slot.process.join(5)
            code = slot.process.exitcode
            ended, signame = _ending(code)
            if code == -signal.SIGTERM:
                # Ended by the SIGTERM itself: it came before the worker's handler, so while nothing served yet.
                log.info(
                    "worker %d stopped before it served (%s)",
                    slot.index,
                    ended,
                    extra={"event": "worker_stopped", "worker": slot.index, "code": code, "signal": signame},
                )
            elif code != 0:
                clean = False
                log.error(
                    "worker %d (pid %s) stopped badly (%s)",
                    slot.index,
                    slot.process.pid,
                    ended,
                    extra={
                        "event": "worker_failed",
                        "worker": slot.index,
                        "pid": slot.process.pid,
                        "code": code,
                        "signal": signame,
                    },
                )
            self._forget(slot.process)
        log.info("stopped", extra={"event": "stopped"})
        return 0 if clean else 1


class MetricsFiles:
    """The workers' multiprocess files, as one collector; a dead worker's counts folded into one file per type.

    prometheus_client keeps a dead process's counter and histogram files for its counts to stay in the sums:
    about 100 KiB a worker, in a /tmp that is a 16 MiB memory-backed emptyDir (deploy/kubernetes): every OOM
    kill or crash would add its two for the life of the pod, until the kubelet evicted it, and every scrape
    read them all. Its live gauges go (`mark_process_dead`). The fold and a scrape take turns: a scrape
    between the fold's write and its delete would count the worker twice, a counter going back down after.
    """

    ARCHIVED = "archived"  # the "pid" of the files of folded counts: counter_archived.db, histogram_archived.db

    def __init__(self, path: str) -> None:
        from prometheus_client import multiprocess

        self._path = path
        self._collector: Any = multiprocess.MultiProcessCollector(None, path=path)  # type: ignore[no-untyped-call]
        self._turn = threading.Lock()

    def collect(self) -> list[Any]:
        with self._turn:
            return list(self._collector.collect())

    def forget(self, pid: int) -> None:
        """A worker that has exited: its live gauges removed, its counts added to the archived ones."""
        from prometheus_client import multiprocess
        from prometheus_client.mmap_dict import MmapedDict

        with self._turn:
            multiprocess.mark_process_dead(pid, self._path)  # type: ignore[no-untyped-call]
            for kind in ("counter", "histogram"):
                dead = os.path.join(self._path, f"{kind}_{pid}.db")
                try:
                    values = MmapedDict.read_all_values_from_file(dead)  # type: ignore[no-untyped-call]
                except FileNotFoundError:
                    continue  # it died before it counted anything
                archive: Any = MmapedDict(os.path.join(self._path, f"{kind}_{self.ARCHIVED}.db"))  # type: ignore[no-untyped-call]
                try:
                    for key, value, timestamp, _ in values:
                        archived, _ = archive.read_value(key)
                        archive.write_value(key, archived + value, timestamp)
                finally:
                    archive.close()
                os.remove(dead)


def _ending(code: int | None) -> tuple[str, str | None]:
    """How a worker ended, for a log line ("exit code 1", "killed by signal 9, SIGKILL"), and its signal's name.

    multiprocessing gives a death by signal N as the exit code -N; an OOM kill is a SIGKILL.
    """
    if code is None or code >= 0:
        return f"exit code {code}", None
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return f"killed by signal {-code}", None
    return f"killed by signal {-code}, {name}", name


@contextlib.contextmanager
def _log_stream_as_stderr() -> Iterator[None]:
    """While a worker is spawned, fd 2 is the file the log lines go to, for the worker to inherit.

    Where logging writes to a stream of its own rather than to fd 2 itself (fd 2 captured through a
    pipe the supervisor reads), a worker writing to the inherited fd 2 would depend on the supervisor
    to pass its lines on, and lose them when the supervisor is killed.
    """
    log_fd = _log_fd()
    if log_fd is None or log_fd == 2:
        yield
        return
    saved = os.dup(2)
    os.dup2(log_fd, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _log_fd() -> int | None:
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        with contextlib.suppress(AttributeError, OSError, ValueError):
            return int(stream.fileno())  # type: ignore[union-attr]
    return None


def _orphaned(supervisor: int) -> bool:
    # The pid the supervisor gave, not the parent found at some point of the start: one that died before the
    # worker looked would make init (or a subreaper) its "supervisor".
    return os.getppid() != supervisor


def _drain_when_orphaned(supervisor: int) -> None:
    """A worker whose supervisor died (SIGKILL, OOM) drains and exits instead of serving on unsupervised."""

    def watch() -> None:
        while not _orphaned(supervisor):
            time.sleep(ORPHAN_CHECK_SECONDS)
        log.error("the supervisor is gone: stopping", extra={"event": "supervisor_gone"})
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _worker_main(settings: Settings, index: int, serve: Serve, supervisor: int) -> None:
    """A worker process: the whole service, metrics to the multiprocess files; its exit code as `serve`'s."""
    # Ctrl-C reaches the whole process group: the worker drains on it as on the supervisor's SIGTERM.
    logs.configure(json_lines=settings.json_logs, worker=index)
    metrics.run_as_worker(index)
    try:
        if _orphaned(supervisor):
            log.error("the supervisor is gone: not starting", extra={"event": "supervisor_gone"})
            sys.exit(1)
        _drain_when_orphaned(supervisor)
        asyncio.run(serve(settings))
    except (ConfigurationError, Unavailable) as error:
        log.error("cannot start: %s", error, extra={"event": "start_failed"})
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        logs.drain()  # multiprocessing ends a worker with os._exit: atexit never runs
