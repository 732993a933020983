"""WatchConfigChanges without gRPC (domain/watch.py): the scope, the stream's events, and their wire form."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from integrations.v1 import integrations_pb2 as pb
from integrations_service.api import convert
from integrations_service.domain.service import etag_of_change
from integrations_service.domain.watch import (
    MAX_WATCHED_PROVIDERS,
    SHUTTING_DOWN,
    ChangeWatches,
    WatchEvent,
    WatchResync,
    WatchScope,
    WatchStarted,
    check_scope,
)
from integrations_service.errors import InvalidArgument, Unavailable
from integrations_service.store import StoredValue
from integrations_service.store.changes import ChangeHub, ChangeKind, ConfigChanged, FeedReset, ResetReason
from integrations_service.store.memory import MemoryStore

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def change(org: str = "org_1", provider: str = "stripe", *, rewrap: bool = False) -> ConfigChanged:
    return ConfigChanged(org, provider, f"row-{org}-{provider}", 3, ChangeKind.SAVED, T0, rewrap)


# --- the scope ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "org", "provider", "matches"),
    [
        (WatchScope(), "org_1", "stripe", True),
        (WatchScope(), "org_2", "resend", True),
        (WatchScope("org_1"), "org_1", "stripe", True),
        (WatchScope("org_1"), "org_2", "stripe", False),
        (WatchScope(None, frozenset({"stripe", "resend"})), "org_2", "resend", True),
        (WatchScope(None, frozenset({"stripe"})), "org_1", "easypay", False),
        (WatchScope("org_1", frozenset({"stripe"})), "org_1", "stripe", True),
        (WatchScope("org_1", frozenset({"stripe"})), "org_2", "stripe", False),
        (WatchScope("org_1", frozenset({"stripe"})), "org_1", "resend", False),
    ],
)
def test_the_scope_filters_by_organization_and_provider(
    scope: WatchScope, org: str, provider: str, matches: bool
) -> None:
    assert scope.matches(change(org, provider)) is matches


def test_an_empty_request_watches_everything_and_duplicates_are_harmless() -> None:
    assert check_scope("", []) == WatchScope()
    assert check_scope("org_1", ["stripe", "stripe", "resend"]) == WatchScope("org_1", frozenset({"stripe", "resend"}))


@pytest.mark.parametrize(
    ("organization_id", "providers", "fields"),
    [
        ("", ["stripe", "nope"], ["providers[1]"]),
        ("", ["stripe", "Stripe", "", "x" * 65], ["providers[1]", "providers[2]", "providers[3]"]),
        ("x" * 129, ["stripe"], ["organization_id"]),
        ("with space", ["nope"], ["organization_id", "providers[0]"]),
        ("", ["stripe"] * (MAX_WATCHED_PROVIDERS + 1), ["providers"]),
    ],
)
def test_a_bad_scope_names_every_bad_field(organization_id: str, providers: list[str], fields: list[str]) -> None:
    with pytest.raises(InvalidArgument) as refused:
        check_scope(organization_id, providers)
    assert [v.field for v in refused.value.violations] == fields


def test_the_most_providers_a_request_may_name_are_accepted() -> None:
    assert check_scope("", ["stripe"] * MAX_WATCHED_PROVIDERS).providers == frozenset({"stripe"})


# --- the stream -----------------------------------------------------------------------------------------


async def take(events: AsyncIterator[WatchEvent], count: int) -> list[WatchEvent]:
    return [await asyncio.wait_for(anext(events), 5) for _ in range(count)]


async def test_started_comes_first_then_the_changes_in_scope_in_order_and_rewraps_are_skipped() -> None:
    hub = ChangeHub(connected=True)
    watches = ChangeWatches(hub)
    stream = watches.watch(WatchScope("org_1"))
    [started] = await take(stream, 1)
    assert isinstance(started, WatchStarted)
    assert watches.open == 1  # subscribed before `started` was handed out
    first, rewrapped, other, second = change(), change(rewrap=True), change("org_2"), change(provider="resend")
    for event in (first, rewrapped, other, second):
        hub.publish(event)
    assert await take(stream, 2) == [first, second]
    assert watches.counts.changes_sent == 2
    await stream.aclose()  # type: ignore[attr-defined]
    assert watches.open == 0
    assert hub.subscribers == 0


@pytest.mark.parametrize("reason", [ResetReason.TRUNCATED, ResetReason.UNDESCRIBED])
async def test_a_reset_the_feed_survives_is_a_resync_and_the_stream_goes_on(reason: ResetReason) -> None:
    hub = ChangeHub(connected=True)
    watches = ChangeWatches(hub)
    stream = watches.watch(WatchScope())
    await take(stream, 1)
    hub.publish(FeedReset(reason))
    hub.publish(change())
    assert await take(stream, 2) == [WatchResync(reason), change()]
    assert watches.counts.resyncs[reason.value] == 1


async def test_a_consumer_that_falls_behind_gets_one_resync_instead_of_what_it_missed() -> None:
    hub = ChangeHub(connected=True)
    watches = ChangeWatches(hub, queue_size=3)
    stream = watches.watch(WatchScope())
    await take(stream, 1)
    for n in range(10):
        hub.publish(change(f"org_{n}"))
    later = change("org_later")
    hub.publish(later)
    assert await take(stream, 2) == [WatchResync(ResetReason.FELL_BEHIND), later]
    assert watches.counts.resyncs["fell_behind"] == 1


async def test_a_burst_out_of_scope_neither_fills_a_streams_queue_nor_wakes_it() -> None:
    hub = ChangeHub(connected=True)
    watches = ChangeWatches(hub, queue_size=3)
    stream = watches.watch(WatchScope("org_1"))
    await take(stream, 1)
    for n in range(100):  # another organization's bulk update, published before the stream runs again
        hub.publish(change(f"org_other_{n}"))
    hub.publish(change(rewrap=True))
    mine = change("org_1")
    hub.publish(mine)
    assert await take(stream, 1) == [mine]
    assert watches.counts.resyncs["fell_behind"] == 0


@pytest.mark.parametrize("reason", [ResetReason.DISCONNECTED, ResetReason.CONNECTED])
async def test_a_lost_feed_ends_the_stream_unavailable(reason: ResetReason) -> None:
    hub = ChangeHub(connected=True)
    watches = ChangeWatches(hub)
    stream = watches.watch(WatchScope())
    await take(stream, 1)
    if reason is ResetReason.DISCONNECTED:
        hub.mark_disconnected()
    else:
        hub.mark_disconnected()
        hub.mark_connected()  # the reconnection's reset replaced the queued disconnection: still a gap
    with pytest.raises(Unavailable, match="change feed"):
        await take(stream, 1)
    assert watches.open == 0


async def test_a_stream_is_refused_while_the_feed_is_not_connected() -> None:
    watches = ChangeWatches(ChangeHub(connected=False))
    with pytest.raises(Unavailable, match="not connected"):
        await take(watches.watch(WatchScope()), 1)
    with pytest.raises(Unavailable, match="no change feed"):
        await take(ChangeWatches(None).watch(WatchScope()), 1)


async def test_shutdown_ends_every_stream_and_refuses_new_ones() -> None:
    hub = ChangeHub(connected=True)
    watches = ChangeWatches(hub)
    streams = [watches.watch(WatchScope()) for _ in range(3)]
    for stream in streams:
        await take(stream, 1)
    waiting = asyncio.ensure_future(take(streams[0], 1))
    await asyncio.sleep(0)
    watches.shutdown()
    for stream in streams[1:]:
        with pytest.raises(Unavailable, match=SHUTTING_DOWN):
            await take(stream, 1)
    with pytest.raises(Unavailable, match=SHUTTING_DOWN):
        await waiting
    with pytest.raises(Unavailable, match=SHUTTING_DOWN):
        await take(watches.watch(WatchScope()), 1)
    assert watches.open == 0
    assert hub.subscribers == 0


async def test_a_closed_store_ends_the_stream_unavailable() -> None:
    hub = ChangeHub(connected=True)
    stream = ChangeWatches(hub).watch(WatchScope())
    await take(stream, 1)
    hub.close()
    with pytest.raises(Unavailable, match=SHUTTING_DOWN):
        await take(stream, 1)


async def test_the_in_memory_store_feeds_a_watch_with_its_writes_and_not_its_rewraps() -> None:
    store = MemoryStore()
    watches = ChangeWatches(store.changes())
    stream = watches.watch(WatchScope("org_1"))
    await take(stream, 1)
    row = await store.upsert("org_1", "stripe", lambda current: {"secretKey": StoredValue("enc:v2:a")})
    assert await store.rewrap([row.id], lambda current: {"secretKey": StoredValue("enc:v2:b")}) == 1
    assert await store.delete("org_1", "stripe", lambda current: None)
    saved, deleted = await take(stream, 2)
    assert saved == ConfigChanged.saved(row)
    assert isinstance(deleted, ConfigChanged)
    assert (deleted.kind, deleted.version) == (ChangeKind.DELETED, row.version)
    await store.close()
    with pytest.raises(Unavailable, match=SHUTTING_DOWN):
        await take(stream, 1)


# --- the wire form ----------------------------------------------------------------------------------


def test_a_save_is_sent_with_its_etag_and_time_and_never_a_value() -> None:
    saved = change()
    message = convert.watch_event_to_pb(saved)
    assert message.WhichOneof("event") == "change"
    expected = pb.ConfigChange(
        organization_id="org_1", provider="stripe", etag=etag_of_change(saved), type=pb.CHANGE_TYPE_SAVED
    )
    expected.change_time.FromDatetime(T0)
    assert message.change == expected
    assert message.change.etag
    assert message.change.change_time.ToDatetime(tzinfo=UTC) == T0
    # Identifiers, an etag and a time: nothing else exists on the message to hold a value.
    assert {field.name for field in pb.ConfigChange.DESCRIPTOR.fields} == {
        "organization_id",
        "provider",
        "etag",
        "type",
        "change_time",
    }


def test_a_delete_is_sent_with_an_empty_etag() -> None:
    deleted = ConfigChanged("org_1", "stripe", "row-1", 4, ChangeKind.DELETED, T0)
    message = convert.watch_event_to_pb(deleted).change
    assert (message.type, message.etag) == (pb.CHANGE_TYPE_DELETED, "")
    assert message.change_time.ToDatetime(tzinfo=UTC) == T0


@pytest.mark.parametrize("reason", [ResetReason.FELL_BEHIND, ResetReason.TRUNCATED, ResetReason.UNDESCRIBED])
def test_a_resync_says_why(reason: ResetReason) -> None:
    message = convert.watch_event_to_pb(WatchResync(reason))
    assert message.WhichOneof("event") == "resync"
    assert message.resync.reason == reason.value


def test_started_carries_its_time() -> None:
    message = convert.watch_event_to_pb(WatchStarted(T0))
    assert message.WhichOneof("event") == "started"
    assert message.started.start_time.ToDatetime(tzinfo=UTC) == T0


def test_the_streams_a_change_fans_out_to_share_one_message_and_the_next_change_gets_its_own() -> None:
    messages = convert.WatchMessages()
    first, second = change("org_1"), change("org_1")  # equal, but two changes: the feed's objects
    assert messages.of(first) is messages.of(first)
    assert messages.of(second) is not messages.of(first)
    assert messages.of(second) == convert.watch_event_to_pb(second)
