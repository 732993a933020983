"""docs/operations.md's metrics table is what the service exposes: names, labels, label values.

Also the series an alert needs from the start: Prometheus' `increase()` sees no increase in a
series that first appears at 1, so a counter the alerts watch for "any increase" must be there
at 0 before its first event.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from integrations_service.crypto import LEGACY_FORMATS
from integrations_service.domain.registry import PROVIDERS
from integrations_service.domain.watch import RESYNC_REASONS
from integrations_service.metrics import Metrics
from integrations_service.store import PoolStats
from integrations_service.store.cached import INVALIDATION_REASONS, RESULTS

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()
# Docs that name metrics in passing; each name must be one the table documents.
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy" / "kubernetes" / "README.md"]
# The supervisor's own counter (supervisor.py), only served with --workers.
SUPERVISOR_METRICS = {"integrations_worker_restarts_total"}
# Names in the docs that look like metrics and are not: a NOTIFY channel, a SQL function, loggers, modules.
NOT_METRICS = {
    "integrations_config_changes",
    "integrations_save_if_unchanged",
    "integrations_client",
    "integrations_pb",
    "integrations_service",
}


class _PooledStore:
    def pool_stats(self) -> PoolStats:
        return PoolStats(size=3, idle=2, max_size=10)


def documented() -> dict[str, dict[str, list[str]]]:
    """The table's rows: metric name -> {label: the values the row lists for it, if any}."""
    rows: dict[str, dict[str, list[str]]] = {}
    for line in OPERATIONS.splitlines():
        match = re.match(r"\| `((?:grpc_server|integrations)_\w+)` \| ([^|]*) \|", line)
        if not match:
            continue
        labels: dict[str, list[str]] = {}
        # "`format` (`plaintext`, `v1`), `provider`": a label, then in brackets the values it takes.
        for label, values in re.findall(r"`(\w+)`(?: \(([^)]*)\))?", match.group(2)):
            labels[label] = re.findall(r"`(\w+)`", values)
        rows[match.group(1)] = labels
    assert rows, "docs/operations.md: no metrics table found"
    return rows


def exposed() -> dict[str, dict[str, set[str]]]:
    """What a fresh service's registry exposes after one of each event: family name -> {label: values seen}."""
    metrics = Metrics(CollectorRegistry(), rpc_counts="plain")
    metrics.rpc("/integrations.v1.IntegrationService/GetProviderConfig").started()
    metrics.stream_rpc("/integrations.v1.IntegrationService/WatchConfigChanges").started()
    metrics.observed("get", 0.001)
    metrics.unavailable("get")
    metrics.decryption_failures.labels("stripe").inc()
    metrics.legacy_values_read.labels("v1", "stripe").inc()
    metrics.legacy_values_refused.labels("plaintext", "stripe").inc()
    metrics.watch(_PooledStore(), lambda: {"default": 1})  # type: ignore[arg-type]
    families: dict[str, dict[str, set[str]]] = {}
    for family in metrics.registry.collect():
        if family.name.startswith(("process_", "python_")):
            continue
        name = f"{family.name}_total" if family.type == "counter" else family.name
        labels = families.setdefault(name, {})
        for sample in family.samples:
            for label, value in sample.labels.items():
                if label != "le":
                    labels.setdefault(label, set()).add(value)
    return families


def test_the_table_documents_exactly_the_exposed_metrics() -> None:
    assert sorted(documented()) == sorted(exposed())


@pytest.mark.parametrize("name", sorted(documented()))
def test_each_documented_metric_has_the_documented_labels(name: str) -> None:
    labels = exposed().get(name)
    assert labels is not None, f"{name} is documented in docs/operations.md but not exposed"
    assert sorted(documented()[name]) == sorted(labels), name


def test_listed_label_values_are_the_codes() -> None:
    rows = documented()
    assert rows["integrations_cache_requests_total"]["result"] == list(RESULTS)
    assert sorted(rows["integrations_cache_invalidations_total"]["reason"]) == sorted(INVALIDATION_REASONS)
    assert sorted(rows["integrations_watch_resyncs_total"]["reason"]) == sorted(RESYNC_REASONS)
    pool_states = rows["integrations_store_pool_connections"]["state"]
    assert set(pool_states) == exposed()["integrations_store_pool_connections"]["state"]
    assert rows["integrations_legacy_values_read_total"]["format"] == list(LEGACY_FORMATS) == ["plaintext", "v1"]
    assert rows["integrations_legacy_values_refused_total"]["format"] == list(LEGACY_FORMATS)


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_metrics_named_anywhere_in_the_docs_exist(doc: Path) -> None:
    known = set(documented()) | SUPERVISOR_METRICS
    named = set(re.findall(r"\b(?:grpc_server|integrations)_[a-z_]*[a-z]\b", doc.read_text()))
    # A family prefix such as `integrations_legacy_values_*` ends in "_": \b stops before it, so drop prefixes.
    named = {name for name in named - NOT_METRICS if not any(k.startswith(name + "_") for k in known)}
    assert named <= known, f"{doc.name} names metrics that do not exist: {sorted(named - known)}"


def test_decryption_failures_are_exposed_at_zero_for_every_provider_before_the_first() -> None:
    """deploy/prometheus/alerts.yml fires on increase(integrations_decryption_failures_total) > 0."""
    metrics = Metrics(CollectorRegistry(), rpc_counts="plain")
    for provider in PROVIDERS:
        value = metrics.registry.get_sample_value("integrations_decryption_failures_total", {"provider": provider.id})
        assert value == 0, provider.id


@pytest.mark.parametrize("name", ["integrations_legacy_values_read_total", "integrations_legacy_values_refused_total"])
def test_legacy_values_are_exposed_at_zero_for_every_format_and_provider_before_the_first(name: str) -> None:
    """The dashboard's legacy-reads panel is a rate(): a series that first appears at 1 hides the first value."""
    metrics = Metrics(CollectorRegistry(), rpc_counts="plain")
    for legacy_format in LEGACY_FORMATS:
        for provider in PROVIDERS:
            labels = {"format": legacy_format, "provider": provider.id}
            assert metrics.registry.get_sample_value(name, labels) == 0, labels
