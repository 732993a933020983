"""No store and no store wrapper falls behind the interface: each abstract method is its own, each extra passed on.

`InstrumentedStore` is generated from the interface, but `CachingStore` passes
every method on by hand (it once missed `list_keys`): a method it inherited
would be abstract (it could not be built) or, with a default body, would
answer for the wrapped store without asking it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from integrations_service.errors import Unavailable
from integrations_service.metrics import Metrics
from integrations_service.sealing import holds_no_clear_text
from integrations_service.store import IntegrationStore, PoolStats
from integrations_service.store.cached import CachingStore
from integrations_service.store.instrumented import InstrumentedStore, instrumented
from integrations_service.store.memory import MemoryStore
from integrations_service.store.postgres import PostgresStore
from integrations_service.store.sqlite import SqliteStore

STORE_CLASSES: list[type[IntegrationStore]] = [MemoryStore, SqliteStore, PostgresStore, InstrumentedStore, CachingStore]
ABSTRACT = sorted(IntegrationStore.__abstractmethods__)
# Methods with a default body in the interface, which a wrapper must still ask the wrapped store for.
PASSED_ON = ("ping", "pool_stats", "changes", "close")
WRAPPERS: dict[str, Callable[[IntegrationStore], IntegrationStore]] = {
    "cached": lambda inner: CachingStore(inner, cacheable=holds_no_clear_text),
    "instrumented": lambda inner: instrumented(inner, Metrics()),
}


def test_the_interface_has_abstract_methods_to_check() -> None:
    assert {"get", "upsert", "list_keys", "list_audit"} <= set(ABSTRACT)


@pytest.mark.parametrize("store_class", STORE_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", ABSTRACT)
def test_every_abstract_method_is_overridden_not_inherited(store_class: type[IntegrationStore], name: str) -> None:
    method = getattr(store_class, name)
    assert method is not getattr(IntegrationStore, name)
    assert not getattr(method, "__isabstractmethod__", False)


@pytest.mark.parametrize("store_class", STORE_CLASSES, ids=lambda c: c.__name__)
def test_every_store_class_can_be_built(store_class: type[IntegrationStore]) -> None:
    assert not store_class.__abstractmethods__


@pytest.mark.parametrize("wrapper", [CachingStore, InstrumentedStore], ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", PASSED_ON)
def test_the_wrappers_override_the_methods_with_a_default_body(wrapper: type[IntegrationStore], name: str) -> None:
    assert getattr(wrapper, name) is not getattr(IntegrationStore, name)


class Answering(MemoryStore):
    """A memory store whose pool statistics and pings are its own, so a wrapper's default answer shows."""

    POOL = PoolStats(size=3, idle=1, max_size=5)

    def __init__(self) -> None:
        super().__init__()
        self.pings = 0

    async def ping(self) -> None:
        self.pings += 1

    def pool_stats(self) -> PoolStats | None:
        return self.POOL


@pytest.mark.parametrize("wrap", WRAPPERS.values(), ids=WRAPPERS.keys())
async def test_the_wrappers_ask_the_wrapped_store_for_ping_pool_stats_changes_and_close(
    wrap: Callable[[IntegrationStore], IntegrationStore],
) -> None:
    inner = Answering()
    store = wrap(inner)

    await store.ping()
    assert inner.pings == 1
    assert store.pool_stats() == Answering.POOL
    assert store.changes() is inner.changes() is not None
    await store.close()
    with pytest.raises(Unavailable):  # closed: the memory store answers as an unreachable database would
        await inner.get("org_1", "stripe")
