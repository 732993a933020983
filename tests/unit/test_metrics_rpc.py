"""The RPC metrics counted in plain ints (one process) expose what prometheus_client's own objects did."""

from __future__ import annotations

import random
import sys
import threading
from collections.abc import Callable
from typing import Literal

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from integrations_service import metrics as metrics_module
from integrations_service.metrics import Metrics, _MirroredRpcFamilies, _PlainRpcFamilies

GET = "/integrations.v1.IntegrationService/GetProviderConfig"
SAVE = "/integrations.v1.IntegrationService/SaveIntegration"
WATCH = "/integrations.v1.IntegrationService/WatchConfigChanges"
GET_LABELS = {
    "grpc_type": "unary",
    "grpc_service": "integrations.v1.IntegrationService",
    "grpc_method": "GetProviderConfig",
}
Code = grpc.StatusCode


def new_metrics(*, plain: bool = False, counts: Literal["plain", "mirrored", "prometheus"] | None = None) -> Metrics:
    return Metrics(CollectorRegistry(), rpc_counts=counts or ("plain" if plain else "prometheus"))


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def rpc_families(text: str) -> str:
    """The exposition minus the process_* and python_* families (they read the process, which moves)."""
    return "\n".join(line for line in text.splitlines() if "process_" not in line and "python_" not in line)


def drive(metrics: Metrics, seed: int) -> None:
    """The same calls, whichever way the metrics are kept: registered methods, a late one, a stream, edge seconds."""
    rnd = random.Random(seed)
    methods = [GET, SAVE]
    for method in methods:
        metrics.rpc(method)
    watch = metrics.stream_rpc(WATCH)
    metrics.rpc("/grpc.health.v1.Health/Check")
    codes = [Code.OK] * 6 + [Code.NOT_FOUND, Code.INVALID_ARGUMENT, Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED]
    # Bucket bounds exactly (le is inclusive), between them, above the last, and zero.
    edges = [0.0, 0.0005, 0.001, 0.0010001, 5.0, 5.5, 30.0]
    for i in range(2000):
        rpc = metrics.rpc(rnd.choice([*methods, "/integrations.v1.IntegrationService/ListProviders"]))
        rpc.started()
        seconds = edges[i % len(edges)] if i % 3 == 0 else rnd.expovariate(200)
        rpc.handled(rnd.choice(codes), seconds)
    for code in (Code.OK, Code.CANCELLED, Code.CANCELLED):
        watch.started()
        watch.sent()
        watch.handled(code)
    watch.started()  # still open
    metrics.rpc(GET).started()  # in flight


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_exposition_is_the_same_as_prometheus_clients_objects_made(seed: int) -> None:
    before, after = new_metrics(plain=False), new_metrics(plain=True)
    drive(before, seed)
    drive(after, seed)
    assert rpc_families(generate_latest(after.registry).decode()) == rpc_families(
        generate_latest(before.registry).decode()
    )
    openmetrics: Callable[[CollectorRegistry], bytes] = generate_openmetrics
    assert rpc_families(openmetrics(after.registry).decode()) == rpc_families(openmetrics(before.registry).decode())


def test_unregistered_methods_are_there_at_zero_with_every_code() -> None:
    before, after = new_metrics(plain=False), new_metrics(plain=True)
    for metrics in (before, after):
        metrics.rpc(GET)
        metrics.stream_rpc(WATCH)
    text = rpc_families(generate_latest(after.registry).decode())
    assert text == rpc_families(generate_latest(before.registry).decode())
    for code in Code:
        assert value(after, "grpc_server_handled_total", **GET_LABELS, grpc_code=code.name) == 0
    assert value(after, "grpc_server_handling_seconds_bucket", **GET_LABELS, le="+Inf") == 0
    assert value(after, "integrations_rpc_duration_seconds_count", method=GET) == 0
    # As before: a unary method's integrations_rpc_requests_total series appear with their code's first call.
    assert value(after, "integrations_rpc_requests_total", method=GET, code="OK") is None
    assert value(after, "integrations_rpc_requests_total", method=WATCH, code="OK") == 0


def test_counts_after_calls_of_different_codes() -> None:
    metrics = new_metrics(plain=True)
    get = metrics.rpc(GET)
    calls = [(Code.OK, 0.0004)] * 5 + [(Code.NOT_FOUND, 0.002)] * 3 + [(Code.INTERNAL, 7.0)] * 2
    for code, seconds in calls:
        get.started()
        get.handled(code, seconds)
    get.started()  # in flight
    assert value(metrics, "grpc_server_started_total", **GET_LABELS) == 11
    assert value(metrics, "grpc_server_msg_received_total", **GET_LABELS) == 11
    assert value(metrics, "grpc_server_msg_sent_total", **GET_LABELS) == 5
    assert value(metrics, "grpc_server_handled_total", **GET_LABELS, grpc_code="OK") == 5
    assert value(metrics, "grpc_server_handled_total", **GET_LABELS, grpc_code="NOT_FOUND") == 3
    assert value(metrics, "grpc_server_handled_total", **GET_LABELS, grpc_code="INTERNAL") == 2
    assert value(metrics, "grpc_server_handled_total", **GET_LABELS, grpc_code="UNAVAILABLE") == 0
    assert value(metrics, "integrations_rpc_requests_total", method=GET, code="OK") == 5
    assert value(metrics, "integrations_rpc_requests_total", method=GET, code="NOT_FOUND") == 3
    assert value(metrics, "integrations_rpc_requests_total", method=GET, code="INTERNAL") == 2
    for histogram, labels in (
        ("grpc_server_handling_seconds", GET_LABELS),
        ("integrations_rpc_duration_seconds", {"method": GET}),
    ):
        assert value(metrics, f"{histogram}_bucket", **labels, le="0.0005") == 5
        assert value(metrics, f"{histogram}_bucket", **labels, le="0.001") == 5
        assert value(metrics, f"{histogram}_bucket", **labels, le="0.0025") == 8
        assert value(metrics, f"{histogram}_bucket", **labels, le="5.0") == 8
        assert value(metrics, f"{histogram}_bucket", **labels, le="+Inf") == 10
        assert value(metrics, f"{histogram}_count", **labels) == 10
        assert value(metrics, f"{histogram}_sum", **labels) == pytest.approx(5 * 0.0004 + 3 * 0.002 + 2 * 7.0)
    watch = metrics.stream_rpc(WATCH)
    watch.started()
    watch.sent()
    watch.sent()
    watch.handled(Code.CANCELLED)
    stream = {**GET_LABELS, "grpc_type": "server_stream", "grpc_method": "WatchConfigChanges"}
    assert value(metrics, "grpc_server_started_total", **stream) == 1
    assert value(metrics, "grpc_server_msg_sent_total", **stream) == 2
    assert value(metrics, "grpc_server_handled_total", **stream, grpc_code="CANCELLED") == 1
    assert value(metrics, "integrations_rpc_requests_total", method=WATCH, code="CANCELLED") == 1
    assert value(metrics, "grpc_server_handling_seconds_count", **stream) is None  # streams have no latency


def test_a_scrape_while_calls_are_recorded_sees_histograms_whose_count_matches_their_buckets() -> None:
    metrics = new_metrics(plain=True)
    get = metrics.rpc(GET)
    stop = threading.Event()

    def calls() -> None:  # the event loop's part, on another thread than the scrape here
        while not stop.is_set():
            for seconds in (0.0001, 0.003, 0.2, 9.0):
                get.started()
                get.handled(Code.OK, seconds)

    writer = threading.Thread(target=calls)
    writer.start()
    try:
        last = 0.0
        for _ in range(300):
            for family in metrics.registry.collect():
                if family.name != "grpc_server_handling_seconds":
                    continue
                samples = {s.labels.get("le", s.name): s.value for s in family.samples}
                buckets = [samples[le] for le in ("0.0005", "0.005", "0.25", "+Inf")]
                assert buckets == sorted(buckets)
                assert samples["grpc_server_handling_seconds_count"] == samples["+Inf"] >= last
                last = samples["+Inf"]
    finally:
        stop.set()
        writer.join()
    assert last > 0


def test_workers_count_in_plain_ints_which_their_mirror_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only prometheus_client's objects write to the multiprocess files the supervisor adds up: a worker's mirror
    # copies its counts into them. One process reads its plain ints at scrape time.
    assert isinstance(Metrics(CollectorRegistry())._grpc, _PlainRpcFamilies)
    monkeypatch.setattr(metrics_module, "_worker", "0")
    monkeypatch.setattr(metrics_module._WorkerMirror, "start", lambda self: None)
    worker = Metrics(CollectorRegistry())
    assert isinstance(worker._grpc, _MirroredRpcFamilies)
    assert worker._mirror is not None
    assert worker._mirror._rpcs is worker._grpc


def mirrored() -> tuple[Metrics, _MirroredRpcFamilies]:
    metrics = new_metrics(counts="mirrored")
    assert isinstance(metrics._grpc, _MirroredRpcFamilies)
    return metrics, metrics._grpc


Families = dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]]


def families(metrics: Metrics) -> Families:
    """Each RPC family's type, help and samples by name and labels: all a multiprocess scrape keeps (not the order
    of the series, which the supervisor's collector makes its own)."""
    parsed = text_string_to_metric_families(rpc_families(generate_latest(metrics.registry).decode()))
    return {
        family.name: (
            family.type,
            family.documentation,
            {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples},
        )
        for family in parsed
    }


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_workers_mirror_copies_into_prometheus_clients_objects_what_they_would_have_counted(seed: int) -> None:
    before = new_metrics(counts="prometheus")
    after, rpcs = mirrored()
    for metrics in (before, after):
        metrics.rpc(GET)
        metrics.stream_rpc(WATCH)
    assert families(after) == families(before)  # every series at zero from the start, before any round
    for calls in (seed, seed + 100):  # the second round copies only what came after the first
        drive(before, calls)
        drive(after, calls)
        rpcs.copy()
        assert families(after) == families(before)
    rpcs.copy()  # nothing new: nothing added
    assert families(after) == families(before)
    assert (
        value(after, "grpc_server_started_total", **GET_LABELS)
        == value(before, "grpc_server_started_total", **GET_LABELS)
        > 0
    )


def test_mirror_rounds_racing_the_calls_and_each_other_copy_every_call_exactly_once() -> None:
    metrics, rpcs = mirrored()
    mirror = metrics_module._WorkerMirror([], "0", rpcs)  # not started: its rounds are run here
    get = metrics.rpc(GET)
    stop = threading.Event()

    def calls() -> None:  # the event loop's part
        while not stop.is_set():
            for code, seconds in ((Code.OK, 0.0001), (Code.NOT_FOUND, 0.003), (Code.OK, 9.0)):
                get.started()
                get.handled(code, seconds)

    def rounds() -> None:
        for _ in range(200):
            mirror.copy()

    threads = [threading.Thread(target=calls), threading.Thread(target=rounds), threading.Thread(target=rounds)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads take turns within a round, not only between rounds
    try:
        for thread in threads:
            thread.start()
        threads[1].join()
        threads[2].join()
    finally:
        stop.set()
        threads[0].join()
        sys.setswitchinterval(interval)
    mirror.copy()  # the last round, as Metrics.last_copy runs it
    started = value(metrics, "grpc_server_started_total", **GET_LABELS)
    assert started is not None
    assert started > 0
    assert value(metrics, "grpc_server_handled_total", **GET_LABELS, grpc_code="OK") == started * 2 / 3
    assert value(metrics, "integrations_rpc_requests_total", method=GET, code="NOT_FOUND") == started / 3
    assert value(metrics, "grpc_server_handling_seconds_count", **GET_LABELS) == started
    assert value(metrics, "grpc_server_handling_seconds_bucket", **GET_LABELS, le="0.0005") == started / 3
    assert value(metrics, "grpc_server_handling_seconds_sum", **GET_LABELS) == pytest.approx(started / 3 * 9.0031)


def test_a_worker_stopping_copies_what_came_since_its_mirrors_last_round(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_module, "_worker", "0")
    monkeypatch.setattr(metrics_module._WorkerMirror, "start", lambda self: None)  # no round but the last
    metrics = Metrics(CollectorRegistry())
    get = metrics.rpc(GET)
    get.started()
    get.handled(Code.OK, 0.002)
    assert value(metrics, "grpc_server_started_total", **GET_LABELS) == 0
    metrics.last_copy()  # as the worker's shutdown runs it (tests/unit/test_worker_stop_metrics.py)
    assert value(metrics, "grpc_server_started_total", **GET_LABELS) == 1
    assert value(metrics, "integrations_rpc_duration_seconds_sum", method=GET) == 0.002
