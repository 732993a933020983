"""The row cache's rules (store/cached.py) on in-memory replicas of one database.

Two `MemoryStore`s on one `MemoryDatabase` are two replicas: a write through
one reaches the other's change feed, as PostgreSQL's notifications do. A
`PausedStore` stops a read between reading the row and returning it, so a
write can land exactly in the window a real race would hit.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from integrations_service.config import load_settings
from integrations_service.errors import ConfigurationError
from integrations_service.store import StoredIntegration
from integrations_service.store.cached import CachingStore
from integrations_service.store.changes import ChangeHub, FeedReset, ResetReason
from integrations_service.store.memory import MemoryDatabase, MemoryStore

ORG = "org_cache"


def put(value: str):  # type: ignore[no-untyped-def]
    return lambda current: {"secretKey": value}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class PausedStore(MemoryStore):
    """A replica whose next `get` reads the row, then waits for `release` before returning it."""

    def __init__(self, database: MemoryDatabase) -> None:
        super().__init__(database)
        self.reads = 0
        self.read_done = asyncio.Event()
        self.release: asyncio.Event | None = None

    def pause(self) -> asyncio.Event:
        """The next read waits, once it has its row, until the returned event is set."""
        self.release = asyncio.Event()
        self.read_done.clear()
        return self.release

    async def get(self, organization_id: str, provider: str) -> StoredIntegration | None:
        self.reads += 1
        row = await super().get(organization_id, provider)
        gate, self.release = self.release, None
        if gate is not None:
            self.read_done.set()
            await gate.wait()
        return row

    async def list_for_organization(self, organization_id: str) -> list[StoredIntegration]:
        self.reads += 1
        return await super().list_for_organization(organization_id)


def replicas(**options: object) -> tuple[CachingStore, PausedStore, MemoryStore]:
    """(the cache of replica A, A's store below it, replica B on the same database)."""
    database = MemoryDatabase()
    inner = PausedStore(database)
    return CachingStore(inner, **options), inner, MemoryStore(database)  # type: ignore[arg-type]


async def test_a_second_read_is_a_hit_and_never_reaches_the_store() -> None:
    cache, inner, other = replicas()
    await other.upsert(ORG, "stripe", put("v1"))
    first = await cache.get(ORG, "stripe")
    second = await cache.get(ORG, "stripe")
    assert first == second
    assert first is not None
    assert first.config == {"secretKey": "v1"}
    assert inner.reads == 1
    assert cache.counts.requests == {"hit": 1, "miss": 1, "bypass": 0}


async def test_no_row_is_cached_and_another_replicas_insert_ends_it() -> None:
    cache, inner, other = replicas()
    assert await cache.get(ORG, "stripe") is None
    assert await cache.get(ORG, "stripe") is None
    assert inner.reads == 1
    await other.upsert(ORG, "stripe", put("v1"))
    row = await cache.get(ORG, "stripe")
    assert row is not None
    assert row.version == 1
    assert cache.counts.invalidations["change"] == 1


async def test_another_replicas_save_and_delete_are_served_at_the_next_read() -> None:
    cache, _, other = replicas()
    await other.upsert(ORG, "stripe", put("v1"))
    await cache.get(ORG, "stripe")
    await other.upsert(ORG, "stripe", put("v2"))
    row = await cache.get(ORG, "stripe")
    assert row is not None
    assert (row.version, row.config["secretKey"]) == (2, "v2")
    await other.delete(ORG, "stripe", lambda current: None)
    assert await cache.get(ORG, "stripe") is None


async def test_its_own_writes_evict_without_waiting_for_the_feed() -> None:
    cache, inner, _ = replicas()
    hub = inner.changes()
    assert isinstance(hub, ChangeHub)
    hub.publish = lambda event: None  # type: ignore[method-assign]  # only the write itself can evict
    await cache.upsert(ORG, "stripe", put("v1"))
    await cache.get(ORG, "stripe")
    await cache.upsert(ORG, "stripe", put("v2"))
    row = await cache.get(ORG, "stripe")
    assert row is not None
    assert row.version == 2
    assert cache.counts.invalidations == {**cache.counts.invalidations, "write": 2, "change": 0}


async def test_a_read_that_raced_a_change_returns_what_it_read_but_does_not_cache_it() -> None:
    cache, inner, other = replicas()
    await other.upsert(ORG, "stripe", put("v1"))
    release = inner.pause()
    racing = asyncio.create_task(cache.get(ORG, "stripe"))
    await inner.read_done.wait()  # it holds version 1
    await other.upsert(ORG, "stripe", put("v2"))  # committed and notified while the read is in flight
    release.set()
    raced = await racing
    assert raced is not None
    assert raced.version == 1  # what the store said when it was asked
    fresh = await cache.get(ORG, "stripe")
    assert fresh is not None
    assert fresh.version == 2, "the raced read repopulated the cache with a stale row"
    assert cache.counts.requests["miss"] == 2


async def test_a_change_of_another_row_does_not_keep_a_racing_read_from_caching() -> None:
    cache, inner, other = replicas()
    await other.upsert(ORG, "stripe", put("v1"))
    release = inner.pause()
    racing = asyncio.create_task(cache.get(ORG, "stripe"))
    await inner.read_done.wait()
    await other.upsert(ORG, "resend", put("r1"))
    release.set()
    await racing
    await cache.get(ORG, "stripe")
    assert cache.counts.requests == {"hit": 1, "miss": 1, "bypass": 0}


@pytest.mark.parametrize("reason", list(ResetReason))
async def test_a_reset_flushes_everything_and_a_read_in_flight_does_not_cache(reason: ResetReason) -> None:
    cache, inner, other = replicas()
    await other.upsert(ORG, "stripe", put("v1"))
    await cache.get(ORG, "resend")
    release = inner.pause()
    racing = asyncio.create_task(cache.get(ORG, "stripe"))
    await inner.read_done.wait()
    hub = inner.changes()
    assert isinstance(hub, ChangeHub)
    hub.publish(FeedReset(reason))
    release.set()
    await racing
    assert cache.entries == 0
    assert cache.counts.invalidations[reason.value] == 1


async def test_while_the_feed_is_disconnected_reads_bypass_and_the_reconnection_flushes() -> None:
    cache, inner, other = replicas()
    await other.upsert(ORG, "stripe", put("v1"))
    await cache.get(ORG, "stripe")
    hub = inner.changes()
    assert isinstance(hub, ChangeHub)
    hub.mark_disconnected()
    hub.publish = lambda event: None  # type: ignore[method-assign]  # changes while disconnected are missed
    await other.upsert(ORG, "stripe", put("v2"))
    for _ in range(3):
        row = await cache.get(ORG, "stripe")
        assert row is not None
        assert row.version == 2
    assert cache.counts.requests["bypass"] == 3
    assert cache.entries == 0
    del hub.publish
    hub.mark_connected()
    row = await cache.get(ORG, "stripe")
    assert row is not None
    assert row.version == 2
    assert cache.counts.invalidations["connected"] == 1


async def test_a_read_during_which_the_feed_went_down_caches_nothing() -> None:
    cache, inner, other = replicas()
    await other.upsert(ORG, "stripe", put("v1"))
    release = inner.pause()
    racing = asyncio.create_task(cache.get(ORG, "stripe"))
    await inner.read_done.wait()
    hub = inner.changes()
    assert isinstance(hub, ChangeHub)
    hub.mark_disconnected()
    hub.mark_connected()
    release.set()
    await racing
    assert cache.entries == 0


async def test_the_ttl_caps_what_a_change_the_feed_missed_can_cost() -> None:
    clock = FakeClock()
    cache, inner, _ = replicas(ttl=5.0, clock=clock)
    await cache.upsert(ORG, "stripe", put("v1"))
    await cache.get(ORG, "stripe")
    # A write the feed never tells of (a SQLite file written by another process).
    database = inner.database
    current = database.rows[(ORG, "stripe")]
    database.rows[(ORG, "stripe")] = replace(current, config={"secretKey": "v2"}, version=2)
    clock.now += 4.9
    row = await cache.get(ORG, "stripe")
    assert row is not None
    assert row.version == 1
    clock.now += 0.2
    row = await cache.get(ORG, "stripe")
    assert row is not None
    assert row.version == 2
    assert cache.counts.invalidations["expired"] == 1


async def test_the_ttl_counts_from_the_start_of_the_read_that_filled_the_entry() -> None:
    clock = FakeClock()
    cache, inner, other = replicas(ttl=5.0, clock=clock)
    await other.upsert(ORG, "stripe", put("v1"))
    release = inner.pause()
    filling = asyncio.create_task(cache.get(ORG, "stripe"))
    await inner.read_done.wait()
    clock.now += 3.0  # a slow read
    release.set()
    await filling
    clock.now += 2.0
    await cache.get(ORG, "stripe")
    assert cache.counts.requests["hit"] == 0


async def test_the_least_recently_used_entry_goes_first_when_full() -> None:
    cache, inner, _ = replicas(max_entries=2)
    await cache.get(ORG, "a")
    await cache.get(ORG, "b")
    await cache.get(ORG, "a")  # b is now the least recently used
    await cache.get(ORG, "c")
    assert cache.entries == 2
    reads = inner.reads
    await cache.get(ORG, "a")
    await cache.get(ORG, "c")
    assert inner.reads == reads
    await cache.get(ORG, "b")
    assert inner.reads == reads + 1


async def test_an_organizations_listing_is_cached_and_any_change_of_it_evicts_it() -> None:
    cache, inner, other = replicas()
    await other.upsert(ORG, "stripe", put("v1"))
    listing = await cache.list_for_organization(ORG)
    listing.clear()  # the caller's own list: the cached one stays whole
    assert [row.provider for row in await cache.list_for_organization(ORG)] == ["stripe"]
    assert inner.reads == 1
    await other.upsert("org_other", "resend", put("r1"))
    await cache.list_for_organization(ORG)
    assert inner.reads == 1
    await other.upsert(ORG, "resend", put("r1"))
    assert [row.provider for row in await cache.list_for_organization(ORG)] == ["resend", "stripe"]


async def test_a_store_without_a_feed_is_never_cached() -> None:
    class Feedless(MemoryStore):
        def changes(self) -> None:  # type: ignore[override]
            return None

    cache = CachingStore(Feedless())
    await cache.get(ORG, "stripe")
    await cache.get(ORG, "stripe")
    assert cache.counts.requests == {"hit": 0, "miss": 0, "bypass": 2}


def test_a_ttl_of_zero_is_no_cache() -> None:
    with pytest.raises(ValueError, match="ttl must be positive"):
        CachingStore(MemoryStore(), ttl=0)


@pytest.mark.parametrize(("raw", "ttl"), [(None, 5.0), ("0", 0.0), ("0.25", 0.25)])
def test_the_ttl_setting_defaults_to_five_seconds_and_zero_is_allowed(raw: str | None, ttl: float) -> None:
    environ = {"INTEGRATIONS_CACHE_TTL": raw} if raw is not None else {}
    assert load_settings(None, environ).cache_ttl == ttl


@pytest.mark.parametrize("raw", ["-1", "soon"])
def test_a_bad_ttl_setting_is_refused_by_name(raw: str) -> None:
    with pytest.raises(ConfigurationError, match="INTEGRATIONS_CACHE_TTL"):
        load_settings(None, {"INTEGRATIONS_CACHE_TTL": raw})
