"""The row cache's rules (store/cached.py) on in-memory replicas of one database.

Two `MemoryStore`s on one `MemoryDatabase` are two replicas: a write through
one reaches the other's change feed, as PostgreSQL's notifications do. A
`PausedStore` stops a read between reading the row and returning it, so a
write can land exactly in the window a real race would hit.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from integrations_service.config import load_settings
from integrations_service.errors import ConfigurationError
from integrations_service.sealing import holds_no_clear_text
from integrations_service.store import StoredIntegration
from integrations_service.store.cached import CachingStore
from integrations_service.store.changes import ChangeHub, ConfigChanged, FeedReset, ResetReason
from integrations_service.store.memory import MemoryDatabase, MemoryStore

ORG = "org_cache"
T = datetime(2026, 1, 2, tzinfo=UTC)


def put(value: str):  # type: ignore[no-untyped-def]
    return lambda current: {"secretKey": value}


def any_row(row: StoredIntegration) -> bool:
    """What the coherence tests let the cache keep: every row (their values are placeholders, not sealed ones);
    which rows serve keeps is tested on its own, with the wiring's rule."""
    return True


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
    options.setdefault("cacheable", any_row)
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


@pytest.mark.parametrize(
    ("stored", "kept"),
    [
        ("enc:v2:k1:bm9uY2U:Y2lwaGVy", True),
        ("enc:v1:bm9uY2U:Y2lwaGVy", True),  # the dashboard's format: ciphertext too, rewritten by `rotate`
        ("", True),  # an unset field
        ("sk_live_legacy_plaintext", False),  # the dashboard's legacy plaintext: a secret as stored
    ],
)
async def test_serve_never_keeps_a_row_or_listing_holding_clear_text(stored: str, kept: bool) -> None:
    """docs/operations.md, Row cache: a row still holding a legacy plaintext value is read from the store each time,
    and so is its organization's listing; the row's other providers' rows are kept as usual."""
    cache, inner, other = replicas(cacheable=holds_no_clear_text)
    await other.upsert(ORG, "stripe", lambda current: {"publishableKey": "enc:v2:k1:bm9uY2U:cGs", "secretKey": stored})
    await other.upsert(ORG, "resend", put("enc:v2:k1:bm9uY2U:cmU"))
    for _ in range(2):
        row = await cache.get(ORG, "stripe")
        assert row is not None
        assert row.config["secretKey"] == stored
        await cache.list_for_organization(ORG)
        await cache.get(ORG, "resend")
    reads_of_each = 1 if kept else 2
    assert inner.reads == reads_of_each * 2 + 1  # stripe's row and the listing, each; resend's row once
    assert cache.entries == (3 if kept else 1)


async def test_a_store_without_a_feed_is_never_cached() -> None:
    class Feedless(MemoryStore):
        def changes(self) -> None:  # type: ignore[override]
            return None

    cache = CachingStore(Feedless(), cacheable=any_row)
    await cache.get(ORG, "stripe")
    await cache.get(ORG, "stripe")
    assert cache.counts.requests == {"hit": 0, "miss": 0, "bypass": 2}


def test_a_ttl_of_zero_is_no_cache() -> None:
    with pytest.raises(ValueError, match="ttl must be positive"):
        CachingStore(MemoryStore(), cacheable=any_row, ttl=0)


@pytest.mark.parametrize(("raw", "ttl"), [(None, 5.0), ("0", 0.0), ("0.25", 0.25)])
def test_the_ttl_setting_defaults_to_five_seconds_and_zero_is_allowed(raw: str | None, ttl: float) -> None:
    environ = {"INTEGRATIONS_CACHE_TTL": raw} if raw is not None else {}
    assert load_settings(None, environ).cache_ttl == ttl


@pytest.mark.parametrize("raw", ["-1", "soon"])
def test_a_bad_ttl_setting_is_refused_by_name(raw: str) -> None:
    with pytest.raises(ConfigurationError, match="INTEGRATIONS_CACHE_TTL"):
        load_settings(None, {"INTEGRATIONS_CACHE_TTL": raw})


# --- every interleaving: reads in flight, writes, notifications, lost and restored connections, time ----------


class GatedStore(MemoryStore):
    """A replica whose every store read takes its snapshot at once and returns only when the test says so."""

    def __init__(self, database: MemoryDatabase, hub: ChangeHub) -> None:
        super().__init__(database)
        self.hub = hub
        self.gates: list[asyncio.Event] = []

    def changes(self) -> ChangeHub:
        return self.hub  # notifications are the test's to deliver, lose or delay

    async def _held(self, rows: list[StoredIntegration]) -> list[StoredIntegration]:
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        return rows

    async def get(self, organization_id: str, provider: str) -> StoredIntegration | None:
        row = self.database.rows.get((organization_id, provider))
        held = await self._held([row] if row is not None else [])
        return held[0] if held else None

    async def list_for_organization(self, organization_id: str) -> list[StoredIntegration]:
        return await self._held([row for (org, _), row in self.database.rows.items() if org == organization_id])


KEYS = [("org_a", "stripe"), ("org_a", "resend"), ("org_b", "stripe")]
ROW_KEYS = KEYS[:2]  # fewer keys: races on one key come up more often
TTL = 5.0
STEPS = st.one_of(
    st.tuples(st.just("get"), st.sampled_from(ROW_KEYS)),
    st.tuples(st.just("list"), st.sampled_from(["org_a", "org_b"])),
    st.tuples(st.just("finish"), st.integers(0, 5)),
    st.tuples(st.just("write"), st.sampled_from(ROW_KEYS)),  # by another replica: its notification is pending
    st.tuples(st.just("own_write"), st.sampled_from(KEYS)),
    st.tuples(st.just("notify"), st.just(0)),  # the oldest pending notification arrives
    st.tuples(st.just("silent"), st.just(0)),  # the connection stops delivering, unnoticed (a partition)
    st.tuples(st.just("lose"), st.just(0)),  # the listener notices the loss
    st.tuples(st.just("connect"), st.just(0)),  # LISTEN in place again
    st.tuples(st.just("tick"), st.sampled_from([0.5, 1.0, 2.5, 4.0])),
)


async def run_interleaving(steps: list[tuple[str, object]]) -> None:
    """Checks every answer against what the cache promises (module docstring of store/cached.py):

    - a read that starts after a change was announced (its notification delivered, a reset published after
      its commit, or the process's own write returned) answers that change or a later one;
    - a read that starts while the feed is disconnected reads the store;
    - an answer from memory was current at some moment less than the TTL before it is given.
    """
    clock = FakeClock()
    database = MemoryDatabase()
    hub = ChangeHub(connected=True)
    inner = GatedStore(database, hub)
    cache = CachingStore(inner, cacheable=any_row, ttl=TTL, clock=clock)
    versions = dict.fromkeys(KEYS, 0)  # 0: no row
    superseded: dict[tuple[tuple[str, str], int], float] = {}  # (key, version) -> when the next one committed
    announced = dict.fromkeys(KEYS, 0)
    pending: list[ConfigChanged] = []
    listening, silent = True, False
    reads: list[tuple[asyncio.Task[object], str, object, dict[tuple[str, str], int], bool]] = []

    def commit(key: tuple[str, str], row: StoredIntegration) -> None:
        superseded[(key, versions[key])] = clock.now
        versions[key] = row.version
        if listening and not silent:
            pending.append(ConfigChanged.saved(row))

    def announce_all() -> None:
        announced.update(versions)

    def check(kind: str, target: object, floor: dict[tuple[str, str], int], hit: bool, answer: object) -> None:
        rows = [answer] if kind == "get" else list(answer)  # type: ignore[call-overload]
        keys = [target] if kind == "get" else [key for key in KEYS if key[0] == target]
        served = {key: 0 for key in keys}
        for row in rows:
            if row is not None:
                served[(row.organization_id, row.provider)] = row.version
        for key, version in served.items():
            assert version >= floor[key], f"{kind} {key} answered version {version} after {floor[key]} was announced"
            if hit and version < versions[key]:
                assert superseded[(key, version)] > clock.now - TTL, f"{key} version {version} served past the TTL"

    async def settle() -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    for kind, arg in steps:
        if kind in ("get", "list"):
            gates = len(inner.gates)
            if kind == "get":
                org, provider = arg  # type: ignore[misc]
                task: asyncio.Task[object] = asyncio.ensure_future(cache.get(org, provider))
            else:
                task = asyncio.ensure_future(cache.list_for_organization(str(arg)))
            started_disconnected = not hub.connected
            await settle()
            hit = len(inner.gates) == gates
            assert not (hit and started_disconnected), "a read answered from memory while the feed was down"
            reads.append((task, kind, arg, dict(announced), hit))
        elif kind == "finish":
            waiting = [gate for gate in inner.gates if not gate.is_set()]
            if waiting:
                waiting[int(arg) % len(waiting)].set()  # type: ignore[call-overload]
        elif kind == "write":
            key = arg
            current = database.rows.get(key)  # type: ignore[call-overload]
            row = (
                StoredIntegration("id-" + "-".join(key), *key, {}, 1, T, T)  # type: ignore[misc]
                if current is None
                else replace(current, version=current.version + 1)
            )
            database.rows[key] = row  # type: ignore[index]
            commit(key, row)  # type: ignore[arg-type]
        elif kind == "own_write":
            org, provider = arg  # type: ignore[misc]
            row = await cache.upsert(org, provider, put("v"))
            commit((org, provider), row)
            announced[(org, provider)] = max(announced[(org, provider)], row.version)
        elif kind == "notify":
            if pending:
                event = pending.pop(0)
                hub.publish(event)
                key = (event.organization_id, event.provider)
                announced[key] = max(announced[key], event.version)
        elif kind == "silent":
            silent = True
            pending.clear()
        elif kind == "lose":
            if listening:
                listening, silent = False, False
                pending.clear()
                hub.mark_disconnected()
                announce_all()
        elif kind == "connect":
            if not listening:
                listening = True
                hub.mark_connected()
                announce_all()
        elif kind == "tick":
            clock.now += float(arg)  # type: ignore[arg-type]
        await settle()
        for read in [read for read in reads if read[0].done()]:
            reads.remove(read)
            task, kind_, target, floor, hit = read
            check(kind_, target, floor, hit, task.result())
    for gate in inner.gates:
        gate.set()
    await settle()
    for task, kind_, target, floor, hit in reads:
        check(kind_, target, floor, hit, await task)


K = KEYS[0]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(STEPS, min_size=4, max_size=30))
# The shapes that matter, always tried: a read that raced a notified change; a slow read (the TTL counts from
# its start); a read across a reconnection; a change made in the gap; a silent partition (the TTL alone).
@example([("get", K), ("write", K), ("notify", 0), ("finish", 0), ("get", K)])
@example([("get", K), ("write", K), ("tick", 4.0), ("finish", 0), ("tick", 2.5), ("get", K)])
@example([("get", K), ("lose", 0), ("write", K), ("connect", 0), ("finish", 0), ("get", K), ("finish", 0)])
@example([("get", K), ("finish", 0), ("lose", 0), ("write", K), ("connect", 0), ("get", K), ("finish", 0)])
@example([("get", K), ("finish", 0), ("silent", 0), ("write", K), ("tick", 4.0), ("get", K), ("tick", 1.0)] * 2)
@example([("list", "org_a"), ("write", K), ("notify", 0), ("finish", 0), ("list", "org_a"), ("get", K)])
def test_no_interleaving_serves_an_announced_change_late_or_a_row_past_its_ttl(steps: list[tuple[str, object]]) -> None:
    asyncio.run(run_interleaving(steps))
