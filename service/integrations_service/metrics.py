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
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import accumulate
from logging import getLogger
from threading import Lock, Thread
from typing import Any, Literal, Protocol, TypeVar
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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from integrations_service.crypto import LEGACY_FORMATS
from integrations_service.domain.registry import PROVIDERS
from integrations_service.domain.watch import WatchCounts
from integrations_service.store import IntegrationStore, PoolStats
from integrations_service.store.cached import INVALIDATION_REASONS, RESULTS, CacheCounts
from integrations_service.store.instrumented import TIMED_OPERATIONS

T = TypeVar("T")
_Scraped = TypeVar("_Scraped", bound=Collector)
log = getLogger("integrations.metrics")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        rpc_counts: Literal["plain", "mirrored", "prometheus"] | None = None,
    ) -> None:
        """`rpc_counts`: how the RPC metrics are kept, chosen once. By default "plain" in one process: plain ints
        read at scrape time (`_PlainRpcFamilies`); "mirrored" under `serve --workers`: the same ints, copied by the
        worker's mirror into prometheus_client's objects, whose multiprocess files are what the supervisor adds up
        (`_MirroredRpcFamilies`). "prometheus": those objects written on every call, what both are checked against.
        """
        # `_created` series double every counter and histogram and no dashboard reads them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry or CollectorRegistry()
        self._http: WSGIServer | None = None
        r = self.registry
        # What prometheus_client's default registry has: process_*, python_info, python_gc_*.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        if rpc_counts is None:
            rpc_counts = "plain" if _worker is None else "mirrored"
        mirrored = _MirroredRpcFamilies(r) if rpc_counts == "mirrored" else None
        self._grpc: _RpcFamilies = mirrored or (
            _PlainRpcFamilies(r) if rpc_counts == "plain" else _PrometheusRpcFamilies(r)
        )
        self._rpcs: dict[str, RpcMetrics] = {}
        self._stream_rpcs: dict[str, StreamRpcMetrics] = {}
        self.decryption_failures = Counter(
            "integrations_decryption_failures",
            "Stored values that failed to decrypt (wrong key, tampering), by provider",
            ["provider"],
            registry=r,
        )
        # At 0 from the start: the alert is increase() > 0, which sees nothing in a series that first appears at 1,
        # so without these the first failure of a provider (after each restart) would never fire it.
        for provider in PROVIDERS:
            self.decryption_failures.labels(provider.id)
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
        # At 0 from the start too: the legacy-reads panel is a rate(), blind to a series' first value.
        for legacy_format in LEGACY_FORMATS:
            for provider in PROVIDERS:
                self.legacy_values_read.labels(legacy_format, provider.id)
                self.legacy_values_refused.labels(legacy_format, provider.id)
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
        # At 0 from the start, as the decryption failures: the unreachable-database alert is increase() > 0.
        for operation in (*TIMED_OPERATIONS, "ping"):
            self.store_unavailable.labels(operation)
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
        self._mirror: _WorkerMirror | None = None
        if _worker is not None:
            self._mirror = _WorkerMirror(self._read_at_scrape, _worker, mirrored)
            self._mirror.start()

    def _scraped(self, collector: _Scraped) -> _Scraped:
        self._read_at_scrape.append(collector)
        if _worker is None:
            self.registry.register(collector)
        return collector

    def rpc(self, method: str) -> RpcMetrics:
        """The instruments of one unary RPC (`/package.Service/Method`), made once and kept."""
        instruments = self._rpcs.get(method)
        if instruments is None:
            instruments = self._rpcs[method] = self._grpc.unary(method)
        return instruments

    def stream_rpc(self, method: str) -> StreamRpcMetrics:
        """The instruments of one server-streaming RPC, made once and kept."""
        instruments = self._stream_rpcs.get(method)
        if instruments is None:
            instruments = self._stream_rpcs[method] = self._grpc.server_stream(method)
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

    def last_copy(self) -> None:
        """A worker's mirror copies everything counted since its last round, once more: for when nothing is
        counted any more (the server has stopped, the audit trail and key usage are closed: the audit trail's
        closing flush counts the records it gives up) and the store is still open (the read-at-scrape state reads
        it). `app.RunningService.stop` runs it between the two; nothing for one process, scraped directly."""
        if self._mirror is not None:
            self._mirror.copy()

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


class RpcMetrics(Protocol):
    """What the interceptor records of one unary call."""

    def started(self) -> None: ...

    def handled(self, code: grpc.StatusCode, seconds: float) -> None: ...


class StreamRpcMetrics(Protocol):
    """What the interceptor records of one server-streaming call (grpc_type="server_stream"): no latency histogram,
    a watch stream lasts as long as its consumer wants, which says nothing about speed."""

    def started(self) -> None: ...

    def sent(self) -> None: ...

    def handled(self, code: grpc.StatusCode) -> None: ...


class _RpcFamilies(Protocol):
    """The families go-grpc-prometheus defines for a server, and the service's own integrations_rpc_*."""

    def unary(self, method: str) -> RpcMetrics: ...

    def server_stream(self, method: str) -> StreamRpcMetrics: ...


# Names and help texts of the RPC families, the same whichever way they are kept.
_GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
_STARTED = ("grpc_server_started", "RPCs started on the server")
_HANDLED = ("grpc_server_handled", "RPCs completed on the server, regardless of outcome")
_HANDLING_SECONDS = (
    "grpc_server_handling_seconds",
    "Response latency of RPCs handled by the server, until the status is sent",
)
_RECEIVED = ("grpc_server_msg_received", "Messages received by the server")
_SENT = ("grpc_server_msg_sent", "Messages sent by the server")
_REQUESTS = ("integrations_rpc_requests", "RPCs handled, by method and status code")
_RPC_SECONDS = ("integrations_rpc_duration_seconds", "RPC latency in the server, by method")
_CODES = tuple(grpc.StatusCode)


def _grpc_labels(grpc_type: str, method: str) -> tuple[str, str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return grpc_type, service, name


class _PrometheusRpcFamilies:
    """The RPC families as prometheus_client objects: what a worker's mirror copies its counts into, since only they
    write to the multiprocess files the supervisor adds up (`_MirroredRpcFamilies`). Recording a unary call on them
    takes 9 locks (5 counters, 2 histograms of 2 values): a worker's calls used to."""

    def __init__(self, r: CollectorRegistry) -> None:
        labels = list(_GRPC_LABELS)
        self.started = Counter(*_STARTED, labels, registry=r)
        self.handled = Counter(*_HANDLED, [*labels, "grpc_code"], registry=r)
        self.seconds = Histogram(*_HANDLING_SECONDS, labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.received = Counter(*_RECEIVED, labels, registry=r)
        self.sent = Counter(*_SENT, labels, registry=r)
        self.rpcs = Counter(*_REQUESTS, ["method", "code"], registry=r)
        self.rpc_seconds = Histogram(*_RPC_SECONDS, ["method"], buckets=_LATENCY_BUCKETS, registry=r)

    def unary(self, method: str) -> RpcMetrics:
        return _PrometheusRpc(method, self)

    def server_stream(self, method: str) -> StreamRpcMetrics:
        return _PrometheusStreamRpc(method, self)


class _PrometheusCalls:
    """The label children of one method that every kind of call has: started (one message received each),
    messages sent, and the codes calls ended with."""

    def __init__(self, grpc_type: str, method: str, families: _PrometheusRpcFamilies) -> None:
        self._labels = labels = _grpc_labels(grpc_type, method)
        self._started = families.started.labels(*labels)
        self._received = families.received.labels(*labels)
        self._sent = families.sent.labels(*labels)
        # Every code exists from the start, as go-grpc-prometheus does: ratios and increase() see zeros, not gaps.
        self._handled = {code: families.handled.labels(*labels, code.name) for code in _CODES}

    def started(self) -> None:
        self._started.inc()
        self._received.inc()

    def _add_started(self, calls: int) -> None:
        if calls:
            self._started.inc(calls)
            self._received.inc(calls)


class _PrometheusRpc(_PrometheusCalls):
    """One unary method's label children, resolved once: recording a call is a few increments."""

    def __init__(self, method: str, families: _PrometheusRpcFamilies) -> None:
        super().__init__("unary", method, families)
        self._seconds = families.seconds.labels(*self._labels)
        self._own_seconds = families.rpc_seconds.labels(method)
        # integrations_rpc_requests_total's children of this method, one per code, made on a code's first call
        # (a label lookup per call costs more than the increment).
        self._own_requests = families.rpcs
        self._method = method
        self._own_by_code: dict[grpc.StatusCode, Counter] = {}

    def handled(self, code: grpc.StatusCode, seconds: float) -> None:
        if code is grpc.StatusCode.OK:
            self._sent.inc()
        self._handled[code].inc()
        self._seconds.observe(seconds)
        self._own(code).inc()
        self._own_seconds.observe(seconds)

    def _own(self, code: grpc.StatusCode) -> Counter:
        own = self._own_by_code.get(code)
        if own is None:
            own = self._own_by_code[code] = self._own_requests.labels(self._method, code.name)
        return own

    def add(self, calls: int, codes: Mapping[grpc.StatusCode, int], buckets: Sequence[int], seconds: float) -> None:
        """Many calls at once (a mirror's round): `started` `calls` times, `handled` `codes[code]` times per code,
        with `buckets[i]` observations in bucket i (not cumulative; the last +Inf's) summing to `seconds`."""
        self._add_started(calls)
        for code, count in codes.items():
            if code is grpc.StatusCode.OK:
                self._sent.inc(count)
            self._handled[code].inc(count)
            self._own(code).inc(count)
        # Not only when a bucket moved: the copy may have read an observation's bucket a round before its seconds.
        if seconds or any(buckets):
            _observed(self._seconds, buckets, seconds)
            _observed(self._own_seconds, buckets, seconds)


def _observed(histogram: Histogram, buckets: Sequence[int], seconds: float) -> None:
    """`buckets[i]` observations added to bucket i of a histogram's child, `seconds` to its sum, at once.

    prometheus_client has no call for it: a child keeps one value per bucket, not cumulative, and one for the sum
    (`Histogram._metric_init`); a unit test checks that this exposes what as many `observe` calls would.
    """
    for value, count in zip(histogram._buckets, buckets, strict=True):
        if count:
            value.inc(count)
    histogram._sum.inc(seconds)


class _PrometheusStreamRpc(_PrometheusCalls):
    """One server-streaming method's label children: calls, their codes, messages."""

    def __init__(self, method: str, families: _PrometheusRpcFamilies) -> None:
        super().__init__("server_stream", method, families)
        self._own = {code: families.rpcs.labels(method, code.name) for code in _CODES}

    def sent(self) -> None:
        self._sent.inc()

    def handled(self, code: grpc.StatusCode) -> None:
        self._handled[code].inc()
        self._own[code].inc()

    def add(self, calls: int, messages: int, codes: Mapping[grpc.StatusCode, int]) -> None:
        """Many streams at once (a mirror's round): started, sent and handled with each code as many times."""
        self._add_started(calls)
        if messages:
            self._sent.inc(messages)
        for code, count in codes.items():
            self._handled[code].inc(count)
            self._own[code].inc(count)


class _PlainRpc:
    """One unary method's counts in plain ints, written by the event loop's thread only (every handler runs there).

    A unary call receives one message, so grpc_server_msg_received is `calls` too; it sends one when it ends OK,
    so grpc_server_msg_sent is the OK count; integrations_rpc_requests_total is grpc_server_handled_total by
    another name, and both latency histograms observe the same seconds against the same buckets: one count each.
    """

    __slots__ = ("_first_of_code", "buckets", "calls", "codes", "labels", "method", "seconds_sum")

    def __init__(self, method: str, first_of_code: Callable[[_PlainRpc, grpc.StatusCode], None]) -> None:
        self.labels = _grpc_labels("unary", method)
        self.method = method
        self.calls = 0
        # Calls by id(code) (an id hashes in C; a StatusCode hashes in Python), only the codes seen so far.
        self.codes: dict[int, int] = {}
        # Observations per bucket, not cumulative (the scrape adds them up); the last is +Inf's.
        self.buckets = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.seconds_sum = 0.0
        self._first_of_code = first_of_code

    def started(self) -> None:
        self.calls += 1

    def handled(self, code: grpc.StatusCode, seconds: float) -> None:
        try:
            self.codes[id(code)] += 1
        except KeyError:  # this method's first call with this code (a try costs nothing until it raises)
            self.codes[id(code)] = 1
            self._first_of_code(self, code)
        # The first bucket whose upper bound is >= seconds, as Histogram.observe finds it.
        self.buckets[bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        self.seconds_sum += seconds


class _PlainStreamRpc:
    """One server-streaming method's counts in plain ints (the event loop's thread writes them)."""

    __slots__ = ("calls", "codes", "labels", "messages", "method")

    def __init__(self, method: str) -> None:
        self.labels = _grpc_labels("server_stream", method)
        self.method = method
        self.calls = 0
        self.messages = 0
        self.codes = {id(code): 0 for code in _CODES}

    def started(self) -> None:
        self.calls += 1

    def sent(self) -> None:
        self.messages += 1

    def handled(self, code: grpc.StatusCode) -> None:
        self.codes[id(code)] += 1


class _PlainRpcFamilies(Collector):
    """The RPC families of one process, counted in plain ints and turned into samples at scrape time.

    A unary call costs an increment, a dict increment, a bisect and a float addition (0.28 µs), where
    prometheus_client's objects took 9 locks (3.8-4.1 µs). Only the event loop's thread writes; the scrape's thread
    reads ints and copies lists, each read atomic under the GIL, so a sample is a value the count really had. A
    histogram's _count is the sum of the copy of its buckets, so the two always agree; its _sum, read next, and the
    other families may be one in-flight call ahead or behind, as with prometheus_client's objects, which lock each
    value on its own.

    The samples come out in the order prometheus_client's objects put them (the order their label children were
    made: methods as registered, integrations_rpc_requests_total's unary codes on their first call), so the text
    exposition is the same byte for byte.
    """

    def __init__(self, r: CollectorRegistry) -> None:
        self._rpcs: list[_PlainRpc | _PlainStreamRpc] = []
        # integrations_rpc_requests_total's series, in the order they appeared.
        self._requests: list[tuple[_PlainRpc | _PlainStreamRpc, grpc.StatusCode]] = []
        r.register(self)

    def unary(self, method: str) -> RpcMetrics:
        rpc = _PlainRpc(method, self._first_of_code)
        self._rpcs.append(rpc)
        return rpc

    def server_stream(self, method: str) -> StreamRpcMetrics:
        rpc = _PlainStreamRpc(method)
        self._rpcs.append(rpc)
        self._requests.extend((rpc, code) for code in _CODES)
        return rpc

    def _first_of_code(self, rpc: _PlainRpc, code: grpc.StatusCode) -> None:
        self._requests.append((rpc, code))

    def collect(self) -> Iterator[Metric]:
        rpcs = list(self._rpcs)
        started = CounterMetricFamily(*_STARTED, labels=_GRPC_LABELS)
        handled = CounterMetricFamily(*_HANDLED, labels=(*_GRPC_LABELS, "grpc_code"))
        seconds = HistogramMetricFamily(*_HANDLING_SECONDS, labels=_GRPC_LABELS)
        received = CounterMetricFamily(*_RECEIVED, labels=_GRPC_LABELS)
        sent = CounterMetricFamily(*_SENT, labels=_GRPC_LABELS)
        rpc_seconds = HistogramMetricFamily(*_RPC_SECONDS, labels=("method",))
        for rpc in rpcs:
            labels = list(rpc.labels)
            calls = rpc.calls
            started.add_metric(labels, calls)
            received.add_metric(labels, calls)
            codes = rpc.codes
            for code in _CODES:
                handled.add_metric([*labels, code.name], codes.get(id(code), 0))
            if isinstance(rpc, _PlainStreamRpc):
                sent.add_metric(labels, rpc.messages)
                continue
            sent.add_metric(labels, codes.get(id(grpc.StatusCode.OK), 0))
            buckets = _cumulative(rpc.buckets)
            total = rpc.seconds_sum
            seconds.add_metric(labels, buckets, total)
            rpc_seconds.add_metric([rpc.method], buckets, total)
        requests = CounterMetricFamily(*_REQUESTS, labels=("method", "code"))
        for rpc, code in list(self._requests):
            requests.add_metric([rpc.method, code.name], rpc.codes.get(id(code), 0))
        yield from (started, handled, seconds, received, sent, requests, rpc_seconds)


_BUCKET_NAMES = tuple(floatToGoString(b) for b in (*_LATENCY_BUCKETS, float("inf")))  # type: ignore[no-untyped-call]


def _cumulative(buckets: list[int]) -> list[tuple[str, float]]:
    """Per-bucket counts as a histogram's cumulative `le` series (copied first: the event loop keeps counting)."""
    return list(zip(_BUCKET_NAMES, accumulate(list(buckets)), strict=True))


_CODE_OF_ID = {id(code): code for code in _CODES}


def _no_first_code(_rpc: _PlainRpc, _code: grpc.StatusCode) -> None:
    """A mirrored method's first call with a code needs nothing: its series is made when the mirror copies it."""


class _MirroredRpcFamilies:
    """A worker's RPC families: the calls counted in plain ints as in one process (`_PlainRpc`), copied into
    prometheus_client's objects, so into the multiprocess files the supervisor adds up, by the worker's mirror.

    A call costs what it costs in one process (0.28 µs), not 9 locks (3.8-4.1 µs); a round of the mirror costs
    a few locked additions per method that had calls since the last (one per series that moved). What a round
    copies is the difference between two copies of each count, each read atomic under the GIL (as a scrape reads
    them in one process): every count reaches the files exactly once, whatever the event loop did meanwhile.
    The objects' label children are made with their method, so every series exists from the start, as before.
    """

    def __init__(self, r: CollectorRegistry) -> None:
        self._target = _PrometheusRpcFamilies(r)
        self._unary: list[_UnaryCopy] = []
        self._streams: list[_StreamCopy] = []

    def unary(self, method: str) -> RpcMetrics:
        plain = _PlainRpc(method, _no_first_code)
        self._unary.append(_UnaryCopy(plain, _PrometheusRpc(method, self._target)))
        return plain

    def server_stream(self, method: str) -> StreamRpcMetrics:
        plain = _PlainStreamRpc(method)
        self._streams.append(_StreamCopy(plain, _PrometheusStreamRpc(method, self._target)))
        return plain

    def copy(self) -> None:
        """What was counted since the last copy, into the objects (one thread at a time: the mirror's lock)."""
        for unary in list(self._unary):  # a copy: the event loop may register a method meanwhile
            unary.copy()
        for stream in list(self._streams):
            stream.copy()


class _UnaryCopy:
    """One unary method's counts as last copied, and where they go."""

    __slots__ = ("buckets", "calls", "codes", "plain", "seconds", "target")

    def __init__(self, plain: _PlainRpc, target: _PrometheusRpc) -> None:
        self.plain = plain
        self.target = target
        self.calls = 0
        self.codes: dict[int, int] = {}
        self.buckets = [0] * len(plain.buckets)
        self.seconds = 0.0

    def copy(self) -> None:
        plain = self.plain
        calls, codes, buckets, seconds = plain.calls, dict(plain.codes), list(plain.buckets), plain.seconds_sum
        last = self.codes
        new_codes = {_CODE_OF_ID[code]: n - last.get(code, 0) for code, n in codes.items() if n != last.get(code, 0)}
        new_buckets = [n - before for n, before in zip(buckets, self.buckets, strict=True)]
        # Kept before the additions: a round that fails half-way loses its counts rather than copying them twice.
        new_calls, new_seconds = calls - self.calls, seconds - self.seconds
        self.calls, self.codes, self.buckets, self.seconds = calls, codes, buckets, seconds
        self.target.add(new_calls, new_codes, new_buckets, new_seconds)


class _StreamCopy:
    """One server-streaming method's counts as last copied, and where they go."""

    __slots__ = ("calls", "codes", "messages", "plain", "target")

    def __init__(self, plain: _PlainStreamRpc, target: _PrometheusStreamRpc) -> None:
        self.plain = plain
        self.target = target
        self.calls = 0
        self.messages = 0
        self.codes = dict(plain.codes)

    def copy(self) -> None:
        plain = self.plain
        calls, messages, codes = plain.calls, plain.messages, dict(plain.codes)
        last = self.codes
        new_codes = {_CODE_OF_ID[code]: n - last[code] for code, n in codes.items() if n != last[code]}
        new_calls, new_messages = calls - self.calls, messages - self.messages
        self.calls, self.messages, self.codes = calls, messages, codes
        self.target.add(new_calls, new_messages, new_codes)


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
    """Copies the read-at-scrape metrics of one worker into multiprocess series labelled `worker`, every second,
    and its RPC counts into the RPC families' own series (`_MirroredRpcFamilies`, no `worker` label: summed).

    Counters stay counters (the supervisor sums each worker's series over its restarts); gauges are the live
    worker's latest value (`livemostrecent`: the supervisor drops a dead worker's gauges).
    """

    INTERVAL = 1.0

    def __init__(self, sources: list[Collector], worker: str, rpcs: _MirroredRpcFamilies | None = None) -> None:
        super().__init__(name="metrics-mirror", daemon=True)
        self._sources = sources
        self._worker = worker
        self._rpcs = rpcs
        # A round copies differences from the last: two at once (the thread's, the last at stop) would copy twice.
        self._round = Lock()
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
        self.copy_rpcs()
        with self._round:
            self._copy_read_at_scrape()

    def copy_rpcs(self) -> None:
        with self._round:
            if self._rpcs is not None:
                self._rpcs.copy()

    def _copy_read_at_scrape(self) -> None:
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
