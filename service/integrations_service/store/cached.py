"""A process-local cache of stored rows, kept coherent by the change feed (store/changes.py).

`CachingStore` wraps any store and answers `get` and `list_for_organization`
from memory; everything else passes through. It holds what the store returns:
ciphertext, never a value decrypted here (decryption, and the audit of each
decrypted read, stay per call above the store). A row the wiring's `cacheable`
refuses (one still holding a legacy plaintext value, until `rotate` rewrites
it) is read from the store every time, and so is a listing that includes one:
no clear text is ever kept in memory. "No row" is cached too.

Why it is never wrong for long:

- Every `ConfigChanged` of the feed evicts that row and its organization's
  listing; a `FeedReset` flushes everything. The feed is polled at every
  access, so an event that reached the process is applied before the next read
  is answered (no consumer task to lag behind).
- While the feed is not connected (PostgreSQL: its LISTEN connection is down)
  reads bypass the cache, store nothing, and the reset that comes with the
  reconnection flushes it.
- A read that raced an invalidation does not store what it read: it takes the
  generation (a count of invalidations) before the store read, and stores its
  result only when no invalidation of its key, or reset, happened meanwhile.
- Its own writes evict at once, without waiting for their notification.
- Whatever happens (a silent partition not noticed yet, a SQLite file written
  by another process), an entry lives at most `ttl` seconds from the start of
  the read that filled it.

So a read serves a committed change at most the notification delay after its
commit while the feed is connected, and at most `ttl` after it in any case.
Call it from the event loop's thread only.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from integrations_service.store.base import (
    AuditEntry,
    AuditRecord,
    IntegrationStore,
    KeyRecord,
    Mutation,
    PoolStats,
    Precondition,
    Rewrite,
    StoredIntegration,
)
from integrations_service.store.changes import ChangeFeed, ConfigChanged, FeedReset, ResetReason, Subscription

T = TypeVar("T")

DEFAULT_MAX_ENTRIES = 10_000
# Seconds; what INTEGRATIONS_CACHE_TTL defaults to.
DEFAULT_TTL = 5.0

RESULTS = ("hit", "miss", "bypass")
# Why entries were dropped: a change from the feed, one of this store's own writes, an entry past its TTL,
# and every reason of a feed reset.
INVALIDATION_REASONS = ("change", "write", "expired", *(reason.value for reason in ResetReason))

# A row (organization, provider) or an organization's listing (organization,).
_Key = tuple[str, ...]
# A row, "no row", or an organization's listing.
_Value = StoredIntegration | tuple[StoredIntegration, ...] | None


@dataclass
class CacheCounts:
    """What the cache did, since the start: read at scrape time by the metrics."""

    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RESULTS, 0))
    invalidations: dict[str, int] = field(default_factory=lambda: dict.fromkeys(INVALIDATION_REASONS, 0))


@dataclass(frozen=True)
class _Entry:
    value: _Value
    expires_at: float


class CachingStore(IntegrationStore):
    """`inner` with its row reads answered from memory while its change feed vouches for them."""

    def __init__(
        self,
        inner: IntegrationStore,
        *,
        cacheable: Callable[[StoredIntegration], bool],
        ttl: float = DEFAULT_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive (a cache that is off is no CachingStore), got {ttl}")
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self._inner = inner
        # Whether a row may be kept: which stored values are clear text is the sealing layer's to say, not the store's.
        self._cacheable = cacheable
        self._ttl = ttl
        self._max_entries = max_entries
        self._clock = clock
        self._feed: ChangeFeed | None = inner.changes()
        # A store without a feed cannot say what changed: every read bypasses the cache.
        self._subscription: Subscription | None = self._feed.subscribe() if self._feed is not None else None
        self._entries: collections.OrderedDict[_Key, _Entry] = collections.OrderedDict()
        # The generation grows with every invalidation. A load stores its result only if neither the last
        # reset nor the last invalidation of its key is newer than the generation it started at. Per key, it
        # is kept only while a load of that key is in flight, so it stays as small as the concurrency.
        self._generation = 0
        self._reset_at = 0
        self._invalidated_at: dict[_Key, int] = {}
        self._loading: collections.Counter[_Key] = collections.Counter()
        self.counts = CacheCounts()

    @property
    def entries(self) -> int:
        return len(self._entries)

    # --- reads --------------------------------------------------------------------------------------

    async def get(self, organization_id: str, provider: str) -> StoredIntegration | None:
        value = await self._cached((organization_id, provider), lambda: self._inner.get(organization_id, provider))
        assert not isinstance(value, tuple)  # a row key only ever holds a row
        return value

    async def list_for_organization(self, organization_id: str) -> list[StoredIntegration]:
        async def load() -> tuple[StoredIntegration, ...]:
            return tuple(await self._inner.list_for_organization(organization_id))

        value = await self._cached((organization_id,), load)
        assert isinstance(value, tuple)  # a listing key only ever holds a listing
        return list(value)  # a list of the caller's own: the cached one stays as it was

    async def _cached(self, key: _Key, load: Callable[[], Awaitable[_Value]]) -> _Value:
        self._apply_feed()
        if not self._trusted():
            self.counts.requests["bypass"] += 1
            return await load()
        started = self._clock()
        entry = self._entries.get(key)
        if entry is not None:
            if entry.expires_at > started:
                self._entries.move_to_end(key)
                self.counts.requests["hit"] += 1
                return entry.value
            del self._entries[key]
            self.counts.invalidations["expired"] += 1
        self.counts.requests["miss"] += 1
        seen = self._generation
        self._loading[key] += 1
        try:
            value = await load()
            self._apply_feed()  # what arrived during the read counts as having raced it
            raced = max(self._reset_at, self._invalidated_at.get(key, 0)) > seen
            if self._trusted() and not raced and self._keepable(value):
                self._store(key, _Entry(value, started + self._ttl))
        finally:
            self._loading[key] -= 1
            if not self._loading[key]:
                del self._loading[key]
                self._invalidated_at.pop(key, None)
        return value

    def _keepable(self, value: _Value) -> bool:
        if value is None:
            return True
        if isinstance(value, tuple):
            return all(self._cacheable(row) for row in value)
        return self._cacheable(value)

    def _trusted(self) -> bool:
        return self._feed is not None and self._feed.connected

    def _store(self, key: _Key, entry: _Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    # --- invalidation -------------------------------------------------------------------------------

    def _apply_feed(self) -> None:
        if self._subscription is None:
            return
        for event in self._subscription.drain():
            if isinstance(event, FeedReset):
                self._flush(event.reason.value)
            elif isinstance(event, ConfigChanged):
                self._evict(event.organization_id, event.provider, "change")

    def _evict(self, organization_id: str, provider: str, reason: str) -> None:
        self.counts.invalidations[reason] += 1
        self._generation += 1
        for key in ((organization_id, provider), (organization_id,)):
            self._entries.pop(key, None)
            if key in self._loading:
                self._invalidated_at[key] = self._generation

    def _flush(self, reason: str) -> None:
        self.counts.invalidations[reason] += 1
        self._entries.clear()
        self._generation += 1
        self._reset_at = self._generation

    # --- writes: passed through, then evicted at once -----------------------------------------------

    async def upsert(
        self, organization_id: str, provider: str, mutate: Mutation, audit: AuditRecord | None = None
    ) -> StoredIntegration:
        try:
            return await self._inner.upsert(organization_id, provider, mutate, audit)
        finally:  # even after an error: the commit may have happened before it
            self._evict(organization_id, provider, "write")

    async def delete(
        self, organization_id: str, provider: str, check: Precondition, audit: AuditRecord | None = None
    ) -> bool:
        try:
            return await self._inner.delete(organization_id, provider, check, audit)
        finally:
            self._evict(organization_id, provider, "write")

    async def rewrap(self, ids: Sequence[str], rewrite: Rewrite, audit: AuditRecord | None = None) -> int:
        try:
            return await self._inner.rewrap(ids, rewrite, audit)
        finally:  # which rows the ids name is not known here: rotations are rare, start over
            self._flush("write")

    # --- everything else passes through -------------------------------------------------------------

    async def ping(self) -> None:
        await self._inner.ping()  # never from the cache: readiness asks the database

    async def scan(self, after_id: str, limit: int) -> list[StoredIntegration]:
        return await self._inner.scan(after_id, limit)

    async def register_keys(self, check_values: Mapping[str, str]) -> list[KeyRecord]:
        return await self._inner.register_keys(check_values)

    async def list_keys(self) -> list[KeyRecord]:
        return await self._inner.list_keys()

    async def add_encryptions(self, counts: Mapping[str, int]) -> None:
        await self._inner.add_encryptions(counts)

    async def retire_key(self, key_id: str) -> None:
        await self._inner.retire_key(key_id)

    async def append_audit(self, records: Sequence[AuditRecord]) -> None:
        await self._inner.append_audit(records)

    async def list_audit(self, organization_id: str, before_id: int, limit: int) -> list[AuditEntry]:
        return await self._inner.list_audit(organization_id, before_id, limit)

    def pool_stats(self) -> PoolStats | None:
        return self._inner.pool_stats()

    def changes(self) -> ChangeFeed | None:
        return self._feed

    async def close(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
        self._entries.clear()
        await self._inner.close()
