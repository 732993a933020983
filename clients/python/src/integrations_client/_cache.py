"""The in-memory cache of decrypted credentials behind `get_config` (never written anywhere else).

Per (organization, provider): fresh for `ttl` seconds after the read that
filled it; after that, when a refresh fails because the service cannot be
reached, the last good value is still served for `stale_if_error` seconds,
with at most one refresh attempt per `retry_interval` (so an outage costs the
callers nothing but one failed attempt now and then). LRU-bounded.

Not thread-safe by itself: the sync client holds its lock around every call,
the async client uses it from its event loop only. Single-flight lives in the
clients, which know their concurrency model.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from integrations_client.models import ProviderCredentials

log = logging.getLogger("integrations_client")

Key = tuple[str, str]
# Failures that mean "the service could not answer", for which a stale value beats an error.
STALE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
MAX_RETRY_INTERVAL = 5.0


@dataclass(frozen=True)
class CacheStats:
    """Counters of the `get_config` cache since the client was built.

    hits: answered from a fresh entry. misses: needed the service (joining
    another caller's read included). coalesced: misses that joined another
    caller's read instead of making their own. stale_served: answered with a
    value past its TTL because the service could not be reached. rpc_count:
    GetProviderConfig calls made (one per read, whatever gRPC's own retries).
    evictions: entries dropped to respect the size bound. size: entries held.
    """

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    stale_served: int = 0
    rpc_count: int = 0
    evictions: int = 0
    size: int = 0


@dataclass
class _Entry:
    value: ProviderCredentials
    fetched_at: float
    retry_at: float = float("-inf")  # while stale after a failure: no new attempt before this


class CredentialCache:
    def __init__(self, ttl: float, max_entries: int, stale_if_error: float, clock: Callable[[], float]) -> None:
        if ttl < 0 or stale_if_error < 0:
            raise ValueError("cache_ttl and stale_if_error must be >= 0")
        if max_entries < 1:
            raise ValueError("cache_max_entries must be >= 1")
        self.ttl = ttl
        self.max_entries = max_entries
        self.stale_if_error = stale_if_error
        self.retry_interval = min(ttl, MAX_RETRY_INTERVAL)
        self.clock = clock
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        self.hits = self.misses = self.coalesced = self.stale_served = self.rpc_count = self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def lookup(self, key: Key) -> ProviderCredentials | None:
        """A value to answer with without calling the service, counted; None when a read is needed."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self.clock()
        if now < entry.fetched_at + self.ttl:
            self.hits += 1
            self._entries.move_to_end(key)
            return entry.value
        if now < entry.retry_at and now < entry.fetched_at + self.ttl + self.stale_if_error:
            self.stale_served += 1
            return entry.value
        return None

    def has_fallback(self, key: Key) -> bool:
        """True when a failed read of `key` could still be answered with a stale value."""
        entry = self._entries.get(key)
        return entry is not None and self.clock() < entry.fetched_at + self.ttl + self.stale_if_error

    def put(self, key: Key, value: ProviderCredentials, fetched_at: float) -> None:
        self._entries[key] = _Entry(value, fetched_at)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1

    def fallback(self, key: Key, code: grpc.StatusCode) -> ProviderCredentials | None:
        """After a failed read: the stale value to serve instead (not counted here), or None to raise."""
        entry = self._entries.get(key)
        if entry is None or code not in STALE_CODES:
            return None
        now = self.clock()
        expired_at = entry.fetched_at + self.ttl
        if now >= expired_at + self.stale_if_error:
            del self._entries[key]  # too old to serve, ever
            return None
        entry.retry_at = now + self.retry_interval
        log.warning(
            "integrations service unreachable (%s): serving the cached config of organization %r, provider %r, "
            "%.1f s past its TTL (stale-if-error window %.0f s); next attempt in %.1f s",
            code.name,
            key[0],
            key[1],
            now - expired_at,
            self.stale_if_error,
            self.retry_interval,
        )
        return entry.value

    def invalidate(self, matches: Callable[[Key], bool]) -> None:
        for key in [key for key in self._entries if matches(key)]:
            del self._entries[key]

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self.hits,
            misses=self.misses,
            coalesced=self.coalesced,
            stale_served=self.stale_served,
            rpc_count=self.rpc_count,
            evictions=self.evictions,
            size=len(self._entries),
        )
