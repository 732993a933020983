"""Every store call is timed under its own name, and none of the interface is left to fall behind."""

from __future__ import annotations

import inspect

import pytest

from integrations_service.errors import Unavailable
from integrations_service.metrics import Metrics
from integrations_service.store import IntegrationStore
from integrations_service.store.instrumented import TIMED_OPERATIONS, UNTIMED, InstrumentedStore, instrumented
from integrations_service.store.memory import MemoryStore


def interface_methods() -> list[str]:
    members = vars(IntegrationStore).items()
    return sorted(name for name, member in members if not name.startswith("_") and inspect.isfunction(member))


@pytest.mark.parametrize("name", interface_methods())
def test_no_method_of_the_interface_is_inherited_instead_of_passed_on(name: str) -> None:
    assert getattr(InstrumentedStore, name) is not getattr(IntegrationStore, name)
    assert not getattr(getattr(InstrumentedStore, name), "__isabstractmethod__", False)


def test_every_method_but_the_untimed_ones_is_abstract_hence_timed() -> None:
    # A new method with a default body would be inherited, not passed on: it must be abstract, or listed as untimed.
    timed = {name for name in interface_methods() if name not in UNTIMED}
    assert timed == set(IntegrationStore.__abstractmethods__) - UNTIMED
    assert set(interface_methods()) >= UNTIMED


def sample_count(metrics: Metrics, operation: str) -> float:
    value = metrics.registry.get_sample_value(
        "integrations_store_operation_duration_seconds_count", {"operation": operation}
    )
    return value or 0.0


async def test_calls_are_passed_through_and_timed_by_operation_unavailable_ones_counted() -> None:
    metrics = Metrics()
    inner = MemoryStore()
    store = instrumented(inner, metrics)
    assert await store.get("org_1", "stripe") is None
    assert await store.get("org_1", "stripe") is None
    await store.add_encryptions({})
    saved = await store.upsert("org_1", "stripe", lambda current: {"secretKey": "enc:v2:k:x"})
    assert await inner.get("org_1", "stripe") == saved
    await store.ping()
    assert store.changes() is inner.changes()
    counts = {op: sample_count(metrics, op) for op in ("get", "upsert", "add_encryptions", "ping")}
    assert counts == {"get": 2.0, "upsert": 1.0, "add_encryptions": 1.0, "ping": 0.0}
    told: list[str] = []
    metrics.store_unavailable_listeners.append(lambda: told.append("unavailable"))
    await store.close()
    with pytest.raises(Unavailable):  # a closed memory store answers as an unreachable database would
        await store.get("org_1", "stripe")
    assert metrics.registry.get_sample_value("integrations_store_unavailable_total", {"operation": "get"}) == 1.0
    assert sample_count(metrics, "get") == 3.0
    assert told == ["unavailable"]


async def test_an_outage_the_readiness_ping_finds_is_counted_though_pings_are_not_timed() -> None:
    # On a replica with no traffic the probe's ping is the only store call: the unreachable-database alert,
    # which counts integrations_store_unavailable_total, must see it.
    metrics = Metrics()
    inner = MemoryStore()
    store = instrumented(inner, metrics)
    await store.ping()
    await inner.close()
    with pytest.raises(Unavailable):
        await store.ping()
    assert metrics.registry.get_sample_value("integrations_store_unavailable_total", {"operation": "ping"}) == 1.0
    assert sample_count(metrics, "ping") == 0.0


def test_every_operation_s_unavailable_series_exists_at_zero_from_the_start() -> None:
    # The alert is increase() > 0, which sees no increase in a series that first appears at 1.
    metrics = Metrics()
    for operation in [*TIMED_OPERATIONS, "ping"]:
        value = metrics.registry.get_sample_value("integrations_store_unavailable_total", {"operation": operation})
        assert value == 0.0, operation
