"""WatchConfigChanges, independent of gRPC: committed changes within a scope, from the process's change feed.

Every stream is one subscription to the store's change feed (store/changes.py),
so a process keeps one LISTEN connection however many streams it serves. A
stream yields `WatchStarted` once its subscription is live, then every change
within its scope, in commit order, and `WatchResync` when changes may have been
missed but the feed is still complete from now on (this stream fell behind, a
TRUNCATE, a change no notification could describe). It ends with `Unavailable`
when it can no longer be kept complete: the feed lost its connection (or got it
back after a gap), the store closed, or the server is shutting down.

Memory per stream is bounded by the subscription's queue (`queue_size` events):
a consumer that does not read is told to resync, never fed without limit.
Events never hold a value: organization, provider, version, time.
"""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from integrations_service.domain.registry import find_provider
from integrations_service.domain.validation import organization_id_problem, provider_id_problem
from integrations_service.errors import FieldViolation, InvalidArgument, Unavailable
from integrations_service.store.changes import (
    DEFAULT_QUEUE_SIZE,
    ChangeFeed,
    ChangeKind,
    ConfigChanged,
    FeedReset,
    ResetReason,
    Subscription,
)

__all__ = ["ChangeKind", "ChangeWatches", "ConfigChanged", "WatchEvent", "WatchResync", "WatchScope", "WatchStarted"]

# At most this many providers in one request (the proto says so).
MAX_WATCHED_PROVIDERS = 16
SHUTTING_DOWN = "server shutting down; reconnect"
# Resets after which the feed is no longer known to be complete: the stream ends, the consumer reconnects.
_FEED_LOST = frozenset({ResetReason.DISCONNECTED, ResetReason.CONNECTED})
RESYNC_REASONS = tuple(reason.value for reason in ResetReason if reason not in _FEED_LOST)


@dataclass(frozen=True)
class WatchScope:
    """Which changes a stream wants: one organization or all (None), some providers or all (None)."""

    organization_id: str | None = None
    providers: frozenset[str] | None = None

    def matches(self, change: ConfigChanged) -> bool:
        if self.organization_id is not None and change.organization_id != self.organization_id:
            return False
        return self.providers is None or change.provider in self.providers

    def wants(self, change: ConfigChanged) -> bool:
        """Whether a watcher of this scope is sent `change`: in scope, and not a rewrap (the etag is unchanged)."""
        return not change.rewrap and self.matches(change)


def check_scope(organization_id: str, providers: Sequence[str]) -> WatchScope:
    """The scope of a request; InvalidArgument naming every bad field (`organization_id`, `providers[3]`)."""
    violations: list[FieldViolation] = []
    if organization_id and (problem := organization_id_problem(organization_id)):
        violations.append(FieldViolation("organization_id", problem))
    if len(providers) > MAX_WATCHED_PROVIDERS:
        violations.append(
            FieldViolation("providers", f"at most {MAX_WATCHED_PROVIDERS} providers, got {len(providers)}")
        )
    else:
        for index, provider in enumerate(providers):
            problem = provider_id_problem(provider)
            if problem is None and find_provider(provider) is None:
                problem = "is not a provider id; ListProviders shows the catalog"
            if problem:
                violations.append(FieldViolation(f"providers[{index}]", problem))
    if violations:
        raise InvalidArgument(violations)
    return WatchScope(organization_id or None, frozenset(providers) or None)


@dataclass(frozen=True)
class WatchStarted:
    """The subscription is live: no committed change within the scope is missed from here on."""

    time: datetime


@dataclass(frozen=True)
class WatchResync:
    """Changes may have been missed: drop whatever was derived from earlier events. The stream stays live."""

    reason: ResetReason


WatchEvent = WatchStarted | ConfigChanged | WatchResync


class WatchCounts:
    """What the streams of this process did (metrics read them at scrape time)."""

    def __init__(self) -> None:
        self.open = 0
        self.changes_sent = 0
        self.resyncs: collections.Counter[str] = collections.Counter({reason: 0 for reason in RESYNC_REASONS})


class ChangeWatches:
    """Serves every watch stream of the process from one change feed; `shutdown` ends them all."""

    def __init__(self, feed: ChangeFeed | None, *, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self._feed = feed
        self._queue_size = queue_size
        self._subscriptions: set[Subscription] = set()
        self._shutting_down = False
        self.counts = WatchCounts()

    @property
    def open(self) -> int:
        return len(self._subscriptions)

    def shutdown(self) -> None:
        """End every stream with UNAVAILABLE (reconnect elsewhere), and refuse new ones. Idempotent."""
        self._shutting_down = True
        for subscription in tuple(self._subscriptions):
            subscription.close()

    async def watch(self, scope: WatchScope) -> AsyncIterator[WatchEvent]:
        """`WatchStarted`, then changes within `scope` and resyncs; raises Unavailable when it cannot go on."""
        feed = self._feed
        if self._shutting_down:
            raise Unavailable(SHUTTING_DOWN)
        if feed is None:
            raise Unavailable("this server has no change feed; watch another replica")
        if not feed.connected:
            raise Unavailable("the change feed is not connected (the database is unreachable); retry")
        # Filtered as it is published: changes out of scope (and rewraps) neither wake this stream nor fill its
        # queue, so another organization's burst cannot make it fall behind.
        subscription = feed.subscribe(queue_size=self._queue_size, accept=scope.wants)
        self._subscriptions.add(subscription)
        self.counts.open = len(self._subscriptions)
        try:
            yield WatchStarted(datetime.now(UTC))
            async for event in subscription:
                if isinstance(event, FeedReset):
                    if event.reason in _FEED_LOST or not feed.connected:
                        raise Unavailable("the change feed lost its database connection; reconnect")
                    self.counts.resyncs[event.reason.value] += 1
                    yield WatchResync(event.reason)
                else:
                    self.counts.changes_sent += 1
                    yield event
            # The subscription was closed: by shutdown(), or by the store closing (the server is stopping).
            raise Unavailable(SHUTTING_DOWN)
        finally:
            subscription.close()
            self._subscriptions.discard(subscription)
            self.counts.open = len(self._subscriptions)
