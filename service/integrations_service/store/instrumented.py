"""Timing of every store call, for metrics, without knowing what the metrics are.

The timed methods are made from `IntegrationStore`'s abstract methods when this
module is imported, so a method added to the store interface is timed (under
its own name) without being written here. The few methods that are not timed
pass through explicitly; a unit test checks that every public method of the
interface is one or the other.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar, cast

from integrations_service import errors
from integrations_service.store.base import IntegrationStore, PoolStats
from integrations_service.store.changes import ChangeFeed

T = TypeVar("T")


class StoreObserver(Protocol):
    def observed(self, operation: str, seconds: float) -> None:
        """A store call ended (in whatever way) after `seconds`."""

    def unavailable(self, operation: str) -> None:
        """A store call found the database unreachable (or too slow to answer)."""


# Not timed: the readiness probe's checks are not calls anyone waits for, and the rest are not database calls.
UNTIMED = frozenset({"ping", "pool_stats", "changes", "close"})
# The operation label of every timed call (each abstract method of the interface, under its own name).
TIMED_OPERATIONS = tuple(sorted(IntegrationStore.__abstractmethods__ - UNTIMED))


class _Passthrough(IntegrationStore):
    """What the instrumented store does besides the timed methods: passes the untimed ones through."""

    def __init__(self, inner: IntegrationStore, observer: StoreObserver) -> None:
        self._inner = inner
        self._observer = observer

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await call
        except errors.Unavailable:
            self._observer.unavailable(operation)
            raise
        finally:
            self._observer.observed(operation, time.perf_counter() - started)

    async def ping(self) -> None:
        # Untimed, but an outage it finds is counted: on a replica with no traffic the readiness probe's ping is
        # the only store call, and the alert on an unreachable database counts these.
        try:
            await self._inner.ping()
        except errors.Unavailable:
            self._observer.unavailable("ping")
            raise

    def pool_stats(self) -> PoolStats | None:
        return self._inner.pool_stats()

    def changes(self) -> ChangeFeed | None:
        return self._inner.changes()

    async def close(self) -> None:
        await self._inner.close()


def _timed_method(name: str) -> Callable[..., Awaitable[Any]]:
    async def timed(self: _Passthrough, *args: Any, **kwargs: Any) -> Any:
        return await self._timed(name, getattr(self._inner, name)(*args, **kwargs))

    timed.__name__ = timed.__qualname__ = name
    timed.__doc__ = getattr(IntegrationStore, name).__doc__
    return timed


InstrumentedStore = cast(
    "type[_Passthrough]",
    abc.ABCMeta(
        "InstrumentedStore",
        (_Passthrough,),
        {
            "__module__": __name__,
            "__doc__": "Times every store call; otherwise passes everything through unchanged.",
            **{name: _timed_method(name) for name in TIMED_OPERATIONS},
        },
    ),
)


def instrumented(store: IntegrationStore, observer: StoreObserver) -> IntegrationStore:
    """`store`, with each call's time and unavailability reported to `observer`."""
    return InstrumentedStore(store, observer)
