"""The change feed: committed changes of `integration_config` rows, fanned out in process.

A store publishes into a `ChangeHub`; consumers (a row cache, watch streams)
see it through the read-only `ChangeFeed` that `IntegrationStore.changes()`
returns, and `subscribe()` to it. How events reach the hub depends on the store:

- PostgreSQL: a trigger on the table calls pg_notify on `CHANGE_CHANNEL` in the
  writing transaction (migration 0003), so every committed write notifies, from
  any replica or from a manual SQL fix, and a rolled-back one never does; one
  LISTEN connection per process publishes what arrives (store/postgres_listener.py).
- SQLite and memory: the store publishes its own writes after they commit.
  SQLite has no notifications, so a write by another process on the same file
  is not seen (a cache bounds that staleness with its TTL).

Guarantees a consumer can build on:

- A subscription is live the moment `subscribe()` returns: while `connected`
  is true, every change committed afterwards reaches it, in commit order.
- Memory is bounded: each subscription queues at most `queue_size` events. One
  that falls behind has its queue replaced by a single `FeedReset`, and
  publishing never blocks or fails the writer. A subscription may `accept` only
  some changes (a watch stream's scope): the others are never queued.
- A `FeedReset` means "anything may have changed": drop what was derived from
  earlier events. It is sent when the listener connects again after a loss
  (changes in the gap are unknown), when it loses its connection, on TRUNCATE,
  and when a change could not be described (a payload over PostgreSQL's limit).
- While `connected` is false, changes may be missed: do not trust a cache.

Events never hold a value, masked or not: only which row changed and its version.
Call everything here from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from types import TracebackType

    from integrations_service.store.base import StoredIntegration

# The PostgreSQL NOTIFY channel of migration 0003's trigger (keep the two the same;
# a test checks). Channels are database-wide: the prefix keeps it apart from other applications'.
CHANGE_CHANNEL = "integrations_config_changes"

# Events a subscription holds before it is told to resynchronize instead.
DEFAULT_QUEUE_SIZE = 1000


class ChangeKind(enum.Enum):
    SAVED = "saved"  # inserted or updated (a rotation's rewrap too: same version, new ciphertext, `rewrap`)
    DELETED = "deleted"


class ResetReason(enum.Enum):
    FELL_BEHIND = "fell_behind"  # this subscription's queue was full
    CONNECTED = "connected"  # the listener (re)connected: changes before it are unknown
    DISCONNECTED = "disconnected"  # the listener lost its connection: changes from now on may be missed
    TRUNCATED = "truncated"  # TRUNCATE integration_config
    UNDESCRIBED = "undescribed"  # a change whose notification was too long or unreadable


@dataclass(frozen=True)
class ConfigChanged:
    """One committed change of one row. `row_id` and `version` give the etag (domain.service.etag_of_change)."""

    organization_id: str
    provider: str
    row_id: str
    version: int
    kind: ChangeKind
    # The row's update time for a save; the time of the delete for a delete.
    time: datetime
    # A save that kept the version (a rotation re-encrypting the same values): the etag and every value are
    # unchanged, only the ciphertext is new. A row cache must drop the row; a watch consumer has nothing to do.
    rewrap: bool = False

    @classmethod
    def saved(cls, row: StoredIntegration) -> ConfigChanged:
        return cls(row.organization_id, row.provider, row.id, row.version, ChangeKind.SAVED, row.updated_at)

    @classmethod
    def rewrapped(cls, row: StoredIntegration) -> ConfigChanged:
        """`row` re-encrypted under another key, same version and values (`rotate`)."""
        return cls(row.organization_id, row.provider, row.id, row.version, ChangeKind.SAVED, row.updated_at, True)

    @classmethod
    def deleted(cls, row: StoredIntegration, time: datetime) -> ConfigChanged:
        return cls(row.organization_id, row.provider, row.id, row.version, ChangeKind.DELETED, time)


@dataclass(frozen=True)
class FeedReset:
    """Anything may have changed: resynchronize."""

    reason: ResetReason


ChangeEvent = ConfigChanged | FeedReset
# Which changes a subscription wants (called in `publish`, for every change: keep it cheap, never raising).
Accept = Callable[[ConfigChanged], bool]


class ChangeFeed(Protocol):
    """What consumers see of a hub: whether it is complete right now, and subscriptions."""

    @property
    def connected(self) -> bool:
        """True while every committed change reaches the subscriptions."""

    def subscribe(self, *, queue_size: int = DEFAULT_QUEUE_SIZE, accept: Accept | None = None) -> Subscription:
        """A new subscription, live as soon as this returns; `accept` (None: every change) picks the changes it
        queues, so the ones it does not want neither wake it nor fill its queue. Resets always reach it."""


class Subscription:
    """An async iterator of events, ending when it or its hub is closed. Close it when done (or use `with`)."""

    def __init__(self, hub: ChangeHub, queue_size: int, accept: Accept | None = None) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self._hub = hub
        self._queue_size = queue_size
        self._accept = accept
        self._events: collections.deque[ChangeEvent] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Events queued and not consumed yet."""
        return len(self._events)

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop receiving; a pending or later `__anext__` ends the iteration. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._events.clear()
        self._hub._forget(self)
        self._wake()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def drain(self) -> list[ChangeEvent]:
        """Every queued event, oldest first, without waiting: for a consumer that polls (the row cache)."""
        events = list(self._events)
        self._events.clear()
        return events

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> ChangeEvent:
        while not self._events:
            if self._closed:
                raise StopAsyncIteration
            if self._wakeup is None:
                self._wakeup = asyncio.Event()
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._events.popleft()

    def _deliver(self, event: ChangeEvent) -> None:
        if isinstance(event, FeedReset):
            # A reset makes everything queued before it moot.
            self._events.clear()
        elif self._accept is not None and not self._accept(event):
            return
        elif len(self._events) >= self._queue_size:
            self._events.clear()
            event = FeedReset(ResetReason.FELL_BEHIND)
        self._events.append(event)
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()


class ChangeHub:
    """Fans events out to any number of subscriptions. The store that owns it publishes; consumers subscribe."""

    def __init__(self, *, connected: bool) -> None:
        self._connected = connected
        # Weak: a subscription its consumer dropped without closing it is forgotten, not fed forever.
        self._subscriptions: weakref.WeakSet[Subscription] = weakref.WeakSet()
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._connected and not self._closed

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def subscribe(self, *, queue_size: int = DEFAULT_QUEUE_SIZE, accept: Accept | None = None) -> Subscription:
        subscription = Subscription(self, queue_size, accept)
        if self._closed:
            subscription.close()
        else:
            self._subscriptions.add(subscription)
        return subscription

    def publish(self, event: ChangeEvent) -> None:
        """Queue `event` for every subscription; never blocks, never raises into the writer."""
        for subscription in tuple(self._subscriptions):
            subscription._deliver(event)

    def mark_connected(self) -> None:
        """The source is complete again: a reset first (the gap is unknown), then `connected`."""
        self.publish(FeedReset(ResetReason.CONNECTED))
        self._connected = True

    def mark_disconnected(self) -> None:
        """The source may miss changes from now on: `connected` goes false, subscriptions get a reset."""
        if not self._connected:
            return
        self._connected = False
        self.publish(FeedReset(ResetReason.DISCONNECTED))

    def close(self) -> None:
        """End every subscription; later ones end at once. Idempotent."""
        self._closed = True
        self._connected = False
        for subscription in tuple(self._subscriptions):
            subscription.close()

    def _forget(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)
