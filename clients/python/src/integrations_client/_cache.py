"""The in-memory cache of decrypted credentials behind `get_config` (never written anywhere else).

Per (organization, provider): fresh for `ttl` seconds after the read that
filled it; after that, when a refresh fails because the service cannot be
reached, the last good value is still served for `stale_if_error` seconds,
with at most one refresh attempt per `retry_interval` (so an outage costs the
callers nothing but one failed attempt now and then). LRU-bounded. The
client's watch stream drops entries earlier: `changed` when a change of the
key arrives (remembering the announced etag, so that `accepts` refuses a read
answering another version), `invalidate` on a resync or a (re)subscription.

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

from integrations_client.errors import ConfigurationError
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

    The watch (see the package README): watching: the change stream is live
    now, so a cached value is stale for at most the notification delay.
    watch_subscriptions: times it became live (each one invalidated
    everything). watch_events: changes it delivered. watch_evictions: cached
    entries those changes dropped. watch_resyncs: times the service said
    changes may have been missed (each one invalidated everything).
    """

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    stale_served: int = 0
    rpc_count: int = 0
    evictions: int = 0
    size: int = 0
    watching: bool = False
    watch_subscriptions: int = 0
    watch_events: int = 0
    watch_evictions: int = 0
    watch_resyncs: int = 0


@dataclass
class _Entry:
    value: ProviderCredentials
    fetched_at: float
    retry_at: float = float("-inf")  # while stale after a failure: no new attempt before this


class CredentialCache:
    def __init__(self, ttl: float, max_entries: int, stale_if_error: float, clock: Callable[[], float]) -> None:
        if ttl < 0 or stale_if_error < 0:
            raise ConfigurationError("cache_ttl and stale_if_error must be >= 0")
        if max_entries < 1:
            raise ConfigurationError("cache_max_entries must be >= 1")
        self.ttl = ttl
        self.max_entries = max_entries
        self.stale_if_error = stale_if_error
        self.retry_interval = min(ttl, MAX_RETRY_INTERVAL)
        self.clock = clock
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()
        # Per key the watch saw change while it was cached or being read: the etag that change produced. A
        # read answering another etag came from a replica whose feed lags: served, not stored (bounded LRU).
        self._expected: OrderedDict[Key, str] = OrderedDict()
        self.hits = self.misses = self.coalesced = self.stale_served = self.rpc_count = self.evictions = 0
        self.watching = False
        self.watch_subscriptions = self.watch_events = self.watch_evictions = self.watch_resyncs = 0

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

    def changed(self, key: Key, etag: str | None, *, reading: bool) -> bool:
        """A committed change of `key` whose new etag is `etag` ("" for a delete): True when the entry was dropped.

        An entry that already holds that version (this client's own save, read back before its event arrived)
        is kept: etags name one version of one stored row. When the key was cached or is being read
        (`reading`), the etag is remembered until a read returns it (see `accepts`). `etag` None: a change
        whose version is unknown (a kind this client does not know): the entry is dropped, no version expected.
        """
        entry = self._entries.get(key)
        if entry is not None and etag and entry.value.etag == etag:
            return False
        if etag is None:
            self._expected.pop(key, None)
        elif entry is not None or reading:
            self._expected[key] = etag
            self._expected.move_to_end(key)
            while len(self._expected) > self.max_entries:
                self._expected.popitem(last=False)
        if entry is None:
            return False
        del self._entries[key]
        return True

    def accepts(self, key: Key, etag: str) -> bool:
        """May a read of `key` that answered `etag` be stored? Not when the watch announced another version."""
        expected = self._expected.get(key)
        if expected is None:
            return True
        if expected != etag:
            return False
        del self._expected[key]
        return True

    def invalidate(self, matches: Callable[[Key], bool]) -> None:
        for key in [key for key in self._entries if matches(key)]:
            del self._entries[key]
        for key in [key for key in self._expected if matches(key)]:
            del self._expected[key]

    def stats(self) -> CacheStats:
        return CacheStats(
            hits=self.hits,
            misses=self.misses,
            coalesced=self.coalesced,
            stale_served=self.stale_served,
            rpc_count=self.rpc_count,
            evictions=self.evictions,
            size=len(self._entries),
            watching=self.watching,
            watch_subscriptions=self.watch_subscriptions,
            watch_events=self.watch_events,
            watch_evictions=self.watch_evictions,
            watch_resyncs=self.watch_resyncs,
        )
