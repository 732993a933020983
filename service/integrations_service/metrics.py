"""Prometheus metrics, on their own HTTP address (INTEGRATIONS_METRICS_ADDRESS).

Labels are bounded sets only: RPC method, status code, store operation,
provider id, key id. Never an organization id, a value or anything else that
grows without bound or could be secret.

The gRPC server metrics carry the names and labels of go-grpc-prometheus and
py-grpc-prometheus (`grpc_server_handled_total{grpc_type,grpc_service,
grpc_method,grpc_code}`, ...), so stock dashboards and alerts work unchanged.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from logging import getLogger
from threading import Thread
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from integrations_service.domain.watch import WatchCounts
from integrations_service.store import IntegrationStore, PoolStats
from integrations_service.store.cached import INVALIDATION_REASONS, RESULTS, CacheCounts

T = TypeVar("T")
_Scraped = TypeVar("_Scraped", bound=Collector)
log = getLogger("integrations.metrics")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # `_created` series double every counter and histogram and no dashboard reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry or CollectorRegistry()
        self._http: WSGIServer | None = None
        r = self.registry
        # What prometheus_client's default registry has: process_*, python_info, python_gc_*.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._grpc = _GrpcServerMetrics(r)
        self._rpcs: dict[str, RpcMetrics] = {}
        self._stream_rpcs: dict[str, StreamRpcMetrics] = {}
        self.rpcs = Counter(
            "integrations_rpc_requests", "RPCs handled, by method and status code", ["method", "code"], registry=r
        )
        self.rpc_seconds = Histogram(
            "integrations_rpc_duration_seconds",
            "RPC latency in the server, by method",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.decryption_failures = Counter(
            "integrations_decryption_failures",
            "Stored values that failed to decrypt (wrong key, tampering), by provider",
            ["provider"],
            registry=r,
        )
        self.legacy_values_read = Counter(
            "integrations_legacy_values_read",
            "Legacy stored values (plaintext, enc:v1) read and served, by format and provider",
            ["format", "provider"],
            registry=r,
        )
        self.legacy_values_refused = Counter(
            "integrations_legacy_values_refused",
            "Legacy stored values refused (INTEGRATIONS_LEGACY_VALUES=refuse), by format and provider",
            ["format", "provider"],
            registry=r,
        )
        self.store_seconds = Histogram(
            "integrations_store_operation_duration_seconds",
            "Store call latency, by operation",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.store_unavailable = Counter(
            "integrations_store_unavailable",
            "Store calls that answered UNAVAILABLE (database unreachable, or too slow to answer), by operation",
            ["operation"],
            registry=r,
        )
        # Called on every store call that found the database unreachable (readiness re-checks at once).
        self.store_unavailable_listeners: list[Callable[[], None]] = []
        # Read at scrape time (set_function, watch): one process's state, which a worker under a supervisor
        # cannot hand to prometheus_client's multiprocess files; `_WorkerMirror` copies it there instead.
        # A new gauge goes through `_scraped` too: a plain Gauge under workers would be one series per pid.
        self._read_at_scrape: list[Collector] = []
        self.audit_buffered = self._scraped(
            _FunctionGauge("integrations_audit_buffered_records", "Audit records waiting to be stored")
        )
        self.audit_dropped = self._scraped(
            _FunctionGauge(
                "integrations_audit_dropped_records",
                "Audit records dropped because the buffer was full while the store was down",
            )
        )
        self.change_feed_connected = self._scraped(
            _FunctionGauge(
                "integrations_change_feed_connected",
                "1 while every committed row change reaches this process (PostgreSQL: its LISTEN connection is up)",
            )
        )
        self.audit_failed = self._scraped(
            _FunctionCounter(
                "integrations_audit_records_failed",
                "Audit records given up: refused by the store even on their own, or not stored before shutdown",
            )
        )
        # Zeros until `serve` wires a row cache in (none with INTEGRATIONS_CACHE_TTL=0): the series always exist.
        self.cache = self._scraped(_CacheCollector())
        # Zeros until `serve` wires the watch streams in.
        self.watches = self._scraped(_WatchCollector())
        if _worker is not None:
            _WorkerMirror(self._read_at_scrape, _worker).start()

    def _scraped(self, collector: _Scraped) -> _Scraped:
        self._read_at_scrape.append(collector)
        if _worker is None:
            self.registry.register(collector)
        return collector

    def rpc(self, method: str) -> RpcMetrics:
        """The instruments of one unary RPC (`/package.Service/Method`), made once and kept."""
        instruments = self._rpcs.get(method)
        if instruments is None:
            instruments = self._rpcs[method] = RpcMetrics(method, self._grpc, self)
        return instruments

    def stream_rpc(self, method: str) -> StreamRpcMetrics:
        """The instruments of one server-streaming RPC, made once and kept."""
        instruments = self._stream_rpcs.get(method)
        if instruments is None:
            instruments = self._stream_rpcs[method] = StreamRpcMetrics(method, self._grpc, self)
        return instruments

    def observed(self, operation: str, seconds: float) -> None:
        """A store call's latency (`store.instrumented.StoreObserver`)."""
        self.store_seconds.labels(operation).observe(seconds)

    def unavailable(self, operation: str) -> None:
        """A store call that answered UNAVAILABLE (`store.instrumented.StoreObserver`)."""
        self.store_unavailable.labels(operation).inc()
        for listener in self.store_unavailable_listeners:
            listener()

    def watch(self, store: IntegrationStore, key_totals: Callable[[], Mapping[str, int]]) -> None:
        """Expose pool use and per-key encryption counts, read at scrape time."""
        self._scraped(_StateCollector(store, key_totals))

    def serve(self, address: str) -> int:
        """Start the /metrics HTTP server in a thread; the port actually bound."""
        host, _, port = address.rpartition(":")
        server = _metrics_server(host.strip("[]"), int(port), make_wsgi_app(self.registry))
        Thread(target=server.serve_forever, args=(_SHUTDOWN_POLL,), name="metrics-http", daemon=True).start()
        self._http = server
        return int(server.server_port)

    async def close(self) -> None:
        """Stop the /metrics HTTP server, if one was started, and release its port."""
        server, self._http = self._http, None
        if server is not None:
            # shutdown() waits for the serving thread's poll loop (up to _SHUTDOWN_POLL): not on the event loop.
            await asyncio.to_thread(server.shutdown)
            server.server_close()


# How often the /metrics thread checks for shutdown between requests. prometheus_client's
# start_http_server polls every 0.5 s, so every stop of the service waited up to half a second for it.
_SHUTDOWN_POLL = 0.02


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (as with prometheus_client's own server)."""


def _metrics_server(host: str, port: int, wsgi_app: Any) -> WSGIServer:
    """prometheus_client's start_http_server, minus its thread: an IPv4 or IPv6 socket as the host needs."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    server_class = type("_MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
    return make_server(str(sockaddr[0]), port, wsgi_app, server_class, handler_class=_QuietHandler)


class _GrpcServerMetrics:
    """The families go-grpc-prometheus defines for a server."""

    def __init__(self, r: CollectorRegistry) -> None:
        labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter("grpc_server_started", "RPCs started on the server", labels, registry=r)
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, regardless of outcome",
            [*labels, "grpc_code"],
            registry=r,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Response latency of RPCs handled by the server, until the status is sent",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.received = Counter("grpc_server_msg_received", "Messages received by the server", labels, registry=r)
        self.sent = Counter("grpc_server_msg_sent", "Messages sent by the server", labels, registry=r)


class RpcMetrics:
    """One unary method's label children, resolved once: recording a call is a few increments."""

    def __init__(self, method: str, grpc_metrics: _GrpcServerMetrics, metrics: Metrics) -> None:
        service, _, name = method.lstrip("/").rpartition("/")
        labels = ("unary", service, name)
        self._started = grpc_metrics.started.labels(*labels)
        self._received = grpc_metrics.received.labels(*labels)
        self._sent = grpc_metrics.sent.labels(*labels)
        self._seconds = grpc_metrics.seconds.labels(*labels)
        # Every code exists from the start, as go-grpc-prometheus does: ratios and increase() see zeros, not gaps.
        self._handled = {code: grpc_metrics.handled.labels(*labels, code.name) for code in grpc.StatusCode}
        self._own_seconds = metrics.rpc_seconds.labels(method)
        # integrations_rpc_requests_total's children of this method, one per code, made on a code's first call
        # (a label lookup per call costs more than the increment).
        self._own_requests = metrics.rpcs
        self._method = method
        self._own_by_code: dict[grpc.StatusCode, Counter] = {}

    def started(self) -> None:
        self._started.inc()
        self._received.inc()

    def handled(self, code: grpc.StatusCode, seconds: float) -> None:
        if code is grpc.StatusCode.OK:
            self._sent.inc()
        self._handled[code].inc()
        self._seconds.observe(seconds)
        own = self._own_by_code.get(code)
        if own is None:
            own = self._own_by_code[code] = self._own_requests.labels(self._method, code.name)
        own.inc()
        self._own_seconds.observe(seconds)


class StreamRpcMetrics:
    """One server-streaming method's label children (grpc_type="server_stream"): calls, their codes, messages.

    No latency histogram: a watch stream lasts as long as its consumer wants, which says nothing about speed.
    """

    def __init__(self, method: str, grpc_metrics: _GrpcServerMetrics, metrics: Metrics) -> None:
        service, _, name = method.lstrip("/").rpartition("/")
        labels = ("server_stream", service, name)
        self._started = grpc_metrics.started.labels(*labels)
        self._received = grpc_metrics.received.labels(*labels)
        self._sent = grpc_metrics.sent.labels(*labels)
        self._handled = {code: grpc_metrics.handled.labels(*labels, code.name) for code in grpc.StatusCode}
        self._own = {code: metrics.rpcs.labels(method, code.name) for code in grpc.StatusCode}

    def started(self) -> None:
        self._started.inc()
        self._received.inc()

    def sent(self) -> None:
        self._sent.inc()

    def handled(self, code: grpc.StatusCode) -> None:
        self._handled[code].inc()
        self._own[code].inc()


class _FunctionCounter(Collector):
    """A counter whose total is kept elsewhere (the domain counts, without knowing Prometheus), read at scrape time."""

    def __init__(self, name: str, documentation: str) -> None:
        self._name = name
        self._documentation = documentation
        self._read: Callable[[], float] = lambda: 0

    def set_function(self, read: Callable[[], float]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._read())


class _CacheCollector(Collector):
    """The row cache's counts (store/cached.py), read at scrape time: the store layer knows no Prometheus."""

    def __init__(self) -> None:
        self.counts = CacheCounts()

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "integrations_cache_requests",
            "Row reads (get, list) by what the row cache did: hit, miss (read the store, may fill the cache), "
            "bypass (the change feed is down: read the store, cache nothing)",
            labels=["result"],
        )
        for result in RESULTS:
            requests.add_metric([result], self.counts.requests[result])
        yield requests
        invalidations = CounterMetricFamily(
            "integrations_cache_invalidations",
            "Row cache invalidations by reason: change (a notified write), write (this process's own), expired "
            "(past INTEGRATIONS_CACHE_TTL), or the reason of a change feed reset (flushes everything)",
            labels=["reason"],
        )
        for reason in INVALIDATION_REASONS:
            invalidations.add_metric([reason], self.counts.invalidations[reason])
        yield invalidations


class _WatchCollector(Collector):
    """What the WatchConfigChanges streams of this process did (domain/watch.py), read at scrape time."""

    def __init__(self) -> None:
        self.counts = WatchCounts()

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "integrations_watch_streams", "WatchConfigChanges streams open in this process", value=self.counts.open
        )
        yield CounterMetricFamily(
            "integrations_watch_changes_sent",
            "Change messages sent on WatchConfigChanges streams (each stream counts its own)",
            value=self.counts.changes_sent,
        )
        resyncs = CounterMetricFamily(
            "integrations_watch_resyncs",
            "Resync messages sent on WatchConfigChanges streams, by reason: fell_behind (the stream's queue was "
            "full), truncated, undescribed",
            labels=["reason"],
        )
        for reason, count in sorted(self.counts.resyncs.items()):
            resyncs.add_metric([reason], count)
        yield resyncs


class _FunctionGauge(_FunctionCounter):
    """A gauge read at scrape time (what `Gauge.set_function` does, but one a worker's mirror can copy)."""

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self._name, self._documentation, value=float(self._read()))


# This process's index when it is one of `serve --workers N` (set by the supervisor before the service starts).
_worker: str | None = None


def run_as_worker(index: int) -> None:
    """From here on, `Metrics` writes to prometheus_client's multiprocess files, labelled `worker=<index>`."""
    global _worker
    _worker = str(index)


class _WorkerMirror(Thread):
    """Copies the read-at-scrape metrics of one worker into multiprocess series labelled `worker`, every second.

    Counters stay counters (the supervisor sums each worker's series over its restarts); gauges are the live
    worker's latest value (`livemostrecent`: the supervisor drops a dead worker's gauges).
    """

    INTERVAL = 1.0

    def __init__(self, sources: list[Collector], worker: str) -> None:
        super().__init__(name="metrics-mirror", daemon=True)
        self._sources = sources
        self._worker = worker
        self._gauges: dict[str, Gauge] = {}
        self._counters: dict[str, Counter] = {}
        self._counted: dict[tuple[str, tuple[str, ...]], float] = {}

    def run(self) -> None:
        while True:
            try:
                self.copy()
            except Exception:  # a scrape-time read racing the event loop; the next round reads again
                log.debug("metrics mirror round failed", exc_info=True)
            time.sleep(self.INTERVAL)

    def copy(self) -> None:
        for source in self._sources:
            for family in source.collect():
                for sample in family.samples:
                    labels = tuple(sample.labels.values())
                    if family.type == "counter":
                        self._count(family, [*sample.labels], labels, sample.value)
                    else:
                        self._gauge(family, [*sample.labels]).labels(*labels, self._worker).set(sample.value)

    def _gauge(self, family: Metric, names: list[str]) -> Gauge:
        gauge = self._gauges.get(family.name)
        if gauge is None:
            gauge = self._gauges[family.name] = Gauge(
                family.name,
                family.documentation,
                [*names, "worker"],
                registry=None,
                multiprocess_mode="livemostrecent",
            )
        return gauge

    def _count(self, family: Metric, names: list[str], labels: tuple[str, ...], value: float) -> None:
        counter = self._counters.get(family.name)
        if counter is None:
            counter = self._counters[family.name] = Counter(
                family.name, family.documentation, [*names, "worker"], registry=None
            )
        child = counter.labels(*labels, self._worker)  # a zero series from the start, as in one process
        last = self._counted.get((family.name, labels), 0.0)
        if value > last:
            child.inc(value - last)
            self._counted[(family.name, labels)] = value


class _StateCollector(Collector):
    def __init__(self, store: IntegrationStore, key_totals: Callable[[], Mapping[str, int]]) -> None:
        self._store = store
        self._key_totals = key_totals

    def collect(self) -> Iterator[Metric]:
        encryptions = GaugeMetricFamily(
            "integrations_key_encryptions", "Encryptions under each key over its life (limit 2**32)", labels=["key_id"]
        )
        for key_id, count in sorted(self._key_totals().items()):
            encryptions.add_metric([key_id], count)
        yield encryptions
        stats: PoolStats | None = self._store.pool_stats()
        if stats is not None:
            pool = GaugeMetricFamily(
                "integrations_store_pool_connections", "PostgreSQL pool connections by state", labels=["state"]
            )
            pool.add_metric(["in_use"], stats.size - stats.idle)
            pool.add_metric(["idle"], stats.idle)
            pool.add_metric(["max"], stats.max_size)
            yield pool
