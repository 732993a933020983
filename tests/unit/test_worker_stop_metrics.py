"""A worker that stops copies its read-at-scrape counters to the multiprocess files one last time.

Under `serve --workers N` a worker's mirror (`metrics._WorkerMirror`) copies what is read at scrape time (row
cache, watch streams, audit records given up...) every second; what a stopping worker counted after its last
round, the audit records its closing flush could not store among them, must still reach the supervisor's sums.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, multiprocess, values

from integrations_service import app
from integrations_service import metrics as metrics_module
from integrations_service.metrics import Metrics
from integrations_service.store import PoolStats


@pytest.fixture
def multiprocess_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """prometheus_client's objects write to multiprocess files in tmp_path, as in a worker of the supervisor."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    value_class = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    monkeypatch.setattr(values, "ValueClass", value_class)
    monkeypatch.setattr(metrics_module, "_worker", "0")
    monkeypatch.setattr(metrics_module._WorkerMirror, "start", lambda self: None)  # its rounds are run here
    yield tmp_path
    value_class.close_all_files()


def summed(path: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """What the supervisor serves from the files: every sample by name and labels."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
    }


class _Store:
    """Reads its pool only while open; `close` is the end of the shutdown order."""

    def __init__(self, events: list[str]) -> None:
        self._events = events
        self.closed = False

    def pool_stats(self) -> PoolStats:
        if self.closed:
            raise RuntimeError("the pool is closed")
        return PoolStats(size=3, idle=2, max_size=10)

    async def close(self) -> None:
        self._events.append("store closed")
        self.closed = True


class _Audit:
    """Its closing flush gives up records, as when the store does not take them before shutdown."""

    def __init__(self, events: list[str]) -> None:
        self._events = events
        self.failed = 1

    async def close(self) -> None:
        self._events.append("audit closed")
        self.failed += 2


class _Closes:
    def __init__(self, events: list[str], what: str) -> None:
        self._events = events
        self._what = what

    async def close(self) -> None:
        self._events.append(f"{self._what} closed")

    async def stop(self, grace: float) -> None:
        self._events.append(f"{self._what} stopped")

    async def enter_graceful_shutdown(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def running_worker(events: list[str]) -> tuple[app.RunningService, Metrics, _Audit]:
    """A worker's service, wired as `app.start` wires its metrics, around stand-ins for what it stops."""
    metrics = Metrics(CollectorRegistry())
    store, audit = _Store(events), _Audit(events)
    metrics.watch(store, lambda: {"k1": 7})  # type: ignore[arg-type]
    metrics.audit_failed.set_function(lambda: audit.failed)
    service = app.RunningService(
        server=_Closes(events, "server"),  # type: ignore[arg-type]
        health=_Closes(events, "health"),  # type: ignore[arg-type]
        store=store,  # type: ignore[arg-type]
        audit=audit,  # type: ignore[arg-type]
        key_usage=_Closes(events, "key_usage"),  # type: ignore[arg-type]
        port=0,
        metrics=metrics,
        metrics_port=None,
        readiness=_Closes(events, "readiness"),  # type: ignore[arg-type]
        watches=_Closes(events, "watches"),  # type: ignore[arg-type]
    )
    return service, metrics, audit


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted({**labels, "worker": "0"}.items()))


async def test_a_stopping_worker_copies_what_its_read_at_scrape_counters_counted_since_the_last_round(
    multiprocess_files: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []
    service, metrics, audit = running_worker(events)
    assert metrics._mirror is not None
    metrics.cache.counts.requests["hit"] = 5
    metrics.watches.counts.changes_sent = 2
    metrics._mirror.copy()  # the last periodic round
    before = summed(multiprocess_files)
    assert before[key("integrations_cache_requests_total", result="hit")] == 5
    assert before[key("integrations_audit_records_failed_total")] == 1
    # Counted after it: a hit, a change sent, a resync, an invalidation, and the closing flush's lost records.
    metrics.cache.counts.requests["hit"] += 1
    metrics.cache.counts.invalidations["write"] += 1
    metrics.watches.counts.changes_sent += 1
    metrics.watches.counts.resyncs["fell_behind"] += 1
    await service.stop(grace=0)
    assert audit.failed == 3
    after = summed(multiprocess_files)
    assert after[key("integrations_cache_requests_total", result="hit")] == 6
    assert after[key("integrations_cache_invalidations_total", reason="write")] == 1
    assert after[key("integrations_watch_changes_sent_total")] == 3
    assert after[key("integrations_watch_resyncs_total", reason="fell_behind")] == 1
    assert after[key("integrations_audit_records_failed_total")] == 3
    # The state read from the store was copied before the store closed, not failed on after.
    assert after[key("integrations_store_pool_connections", state="in_use")] == 1
    assert events.index("audit closed") < events.index("store closed")
    assert not [r for r in caplog.records if getattr(r, "event", None) == "stop_failed"]


async def test_the_last_copy_failing_does_not_keep_the_store_open(
    multiprocess_files: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []
    service, _, _ = running_worker(events)

    def fails(self: Any) -> None:
        raise OSError("no space left for the multiprocess files")

    monkeypatch.setattr(metrics_module._WorkerMirror, "copy", fails)
    await service.stop(grace=0)
    assert "store closed" in events
    assert [getattr(r, "store", None) for r in caplog.records if getattr(r, "event", None) == "stop_failed"] == [
        "metrics"
    ]
