"""The change feed's in-process rules: fan-out, bounded queues, resets, close, and reading notifications."""

from __future__ import annotations

import asyncio
import gc
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from integrations_service.api.convert import watch_event_to_pb
from integrations_service.domain.service import etag_of, etag_of_change
from integrations_service.store import StoredIntegration
from integrations_service.store.changes import (
    ChangeHub,
    ChangeKind,
    ConfigChanged,
    FeedReset,
    ResetReason,
    Subscription,
)
from integrations_service.store.postgres_listener import parse_notification

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)


def row(version: int = 1, org: str = "org_1", provider: str = "stripe") -> StoredIntegration:
    return StoredIntegration("row-1", org, provider, {"secretKey": "enc:v2:x"}, version, T0, T0)


def drain(subscription: Subscription) -> list[object]:
    events = []
    while subscription.pending:
        events.append(subscription._events.popleft())
    return events


async def test_every_subscriber_gets_every_event_in_order() -> None:
    hub = ChangeHub(connected=True)
    first, second = hub.subscribe(), hub.subscribe()
    events = [ConfigChanged.saved(row(version)) for version in range(1, 4)]
    for event in events:
        hub.publish(event)
    assert [await anext(first) for _ in events] == events
    assert [await anext(second) for _ in events] == events


async def test_a_waiting_subscriber_is_woken_by_a_publish() -> None:
    hub = ChangeHub(connected=True)
    with hub.subscribe() as subscription:
        waiting = asyncio.ensure_future(anext(subscription))
        await asyncio.sleep(0)
        assert not waiting.done()
        hub.publish(ConfigChanged.saved(row()))
        assert await asyncio.wait_for(waiting, 1) == ConfigChanged.saved(row())


async def test_a_slow_subscriber_gets_one_reset_instead_of_growing_while_a_fast_one_keeps_everything() -> None:
    hub = ChangeHub(connected=True)
    slow = hub.subscribe(queue_size=10)
    fast = hub.subscribe(queue_size=10)
    received = []
    for version in range(1, 26):
        hub.publish(ConfigChanged.saved(row(version)))
        received.extend(drain(fast))
        assert slow.pending <= 10
    assert [event.version for event in received] == list(range(1, 26))  # type: ignore[attr-defined]
    # 11 and 21 found the queue full: each became the reset that stands for everything before it.
    assert drain(slow) == [FeedReset(ResetReason.FELL_BEHIND), *(ConfigChanged.saved(row(v)) for v in (22, 23, 24, 25))]


def test_a_reset_replaces_what_was_queued_before_it() -> None:
    hub = ChangeHub(connected=True)
    subscription = hub.subscribe()
    hub.publish(ConfigChanged.saved(row(1)))
    hub.publish(FeedReset(ResetReason.TRUNCATED))
    hub.publish(ConfigChanged.saved(row(2)))
    assert drain(subscription) == [FeedReset(ResetReason.TRUNCATED), ConfigChanged.saved(row(2))]


def test_connected_goes_false_with_a_reset_and_comes_back_after_one() -> None:
    hub = ChangeHub(connected=False)
    subscription = hub.subscribe()
    assert not hub.connected
    hub.mark_connected()
    assert hub.connected
    hub.mark_disconnected()
    hub.mark_disconnected()  # once
    assert not hub.connected
    assert drain(subscription) == [FeedReset(ResetReason.DISCONNECTED)]


async def test_closing_the_hub_ends_every_subscription_and_later_ones() -> None:
    hub = ChangeHub(connected=True)
    subscription = hub.subscribe()
    waiting = asyncio.ensure_future(anext(subscription))
    await asyncio.sleep(0)
    hub.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 1)
    assert not hub.connected
    assert hub.subscribers == 0
    assert [event async for event in hub.subscribe()] == []


async def test_a_closed_subscription_is_forgotten_and_ends() -> None:
    hub = ChangeHub(connected=True)
    subscription = hub.subscribe()
    subscription.close()
    hub.publish(ConfigChanged.saved(row()))
    assert hub.subscribers == 0
    assert [event async for event in subscription] == []


def test_a_subscription_dropped_without_close_is_forgotten() -> None:
    hub = ChangeHub(connected=True)
    hub.subscribe()
    gc.collect()
    assert hub.subscribers == 0


def test_a_subscription_queues_only_the_changes_it_accepts_and_every_reset() -> None:
    hub = ChangeHub(connected=True)
    wanted = ConfigChanged.saved(row(2))
    picky = hub.subscribe(queue_size=2, accept=lambda change: change.version == 2)
    for version in (1, 3, 4, 5, 6):
        hub.publish(ConfigChanged.saved(row(version)))
    assert picky.pending == 0  # nothing it refused counts against its queue
    hub.publish(wanted)
    hub.publish(FeedReset(ResetReason.TRUNCATED))
    hub.publish(wanted)
    assert picky.drain() == [FeedReset(ResetReason.TRUNCATED), wanted]


def test_a_queue_must_hold_something() -> None:
    with pytest.raises(ValueError, match="queue_size"):
        ChangeHub(connected=True).subscribe(queue_size=0)


def test_the_etag_of_a_save_is_the_rows_and_a_delete_has_none() -> None:
    saved = row(7)
    assert etag_of_change(ConfigChanged.saved(saved)) == etag_of(saved)
    assert etag_of_change(ConfigChanged.deleted(saved, T0)) == ""


# --- notifications (migration 0003's payloads) ------------------------------------------------------


def test_a_save_and_a_delete_notification_are_read() -> None:
    payload = {
        "operation": "saved",
        "organization_id": "org_1",
        "provider": "stripe",
        "id": "row-1",
        "version": 3,
        "time": "2026-01-02T03:04:05.678901Z",
    }
    assert parse_notification(json.dumps(payload)) == ConfigChanged("org_1", "stripe", "row-1", 3, ChangeKind.SAVED, T0)
    payload["operation"] = "deleted"
    assert parse_notification(json.dumps(payload)).kind is ChangeKind.DELETED  # type: ignore[union-attr]


def test_a_rewrap_is_told_apart_and_a_payload_from_before_migration_0004_reads_as_a_change() -> None:
    payload: dict[str, object] = {
        "operation": "saved",
        "organization_id": "org_1",
        "provider": "stripe",
        "id": "row-1",
        "version": 3,
        "time": "2026-01-02T03:04:05.678901Z",
    }
    old = parse_notification(json.dumps(payload))  # no "rewrap" key: a change watchers are sent
    assert old == ConfigChanged("org_1", "stripe", "row-1", 3, ChangeKind.SAVED, T0, rewrap=False)
    payload["rewrap"] = True
    assert parse_notification(json.dumps(payload)) == ConfigChanged(
        "org_1", "stripe", "row-1", 3, ChangeKind.SAVED, T0, rewrap=True
    )
    payload["rewrap"] = "yes"  # untrusted: anything but a boolean resynchronizes
    assert parse_notification(json.dumps(payload)) == FeedReset(ResetReason.UNDESCRIBED)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ('{"operation": "reset", "reason": "truncated"}', ResetReason.TRUNCATED),
        ('{"operation": "reset", "reason": "undescribed"}', ResetReason.UNDESCRIBED),
        ('{"operation": "reset", "reason": "something new"}', ResetReason.UNDESCRIBED),
        # Only the trigger's own reasons: a forged "the listener reconnected" or "fell behind" would end every
        # watch stream (UNAVAILABLE) on every replica, and count as what it is not.
        ('{"operation": "reset", "reason": "connected"}', ResetReason.UNDESCRIBED),
        ('{"operation": "reset", "reason": "disconnected"}', ResetReason.UNDESCRIBED),
        ('{"operation": "reset", "reason": "fell_behind"}', ResetReason.UNDESCRIBED),
        ('{"operation": "reset", "reason": ["truncated"]}', ResetReason.UNDESCRIBED),
        # Nested deeper than the JSON decoder recurses (RecursionError), within pg_notify's 8000 bytes.
        ("[" * 7999, ResetReason.UNDESCRIBED),
        ('{"operation": ' + "[" * 7000, ResetReason.UNDESCRIBED),
        (
            '{"operation": "saved", "organization_id": "o", "provider": "p", "id": "i", "version": '
            + "9" * 5000
            + ', "time": "2026-01-02T03:04:05Z"}',
            ResetReason.UNDESCRIBED,
        ),
        ("\x00\udcff", ResetReason.UNDESCRIBED),
        ("not json", ResetReason.UNDESCRIBED),
        ("[]", ResetReason.UNDESCRIBED),
        ('{"operation": "saved"}', ResetReason.UNDESCRIBED),
        (
            '{"operation": "renamed", "organization_id": "o", "provider": "p", "id": "i", "version": 1,'
            ' "time": "2026-01-02T03:04:05Z"}',
            ResetReason.UNDESCRIBED,
        ),
        (
            '{"operation": "saved", "organization_id": 1, "provider": "p", "id": "i", "version": 1,'
            ' "time": "2026-01-02T03:04:05Z"}',
            ResetReason.UNDESCRIBED,
        ),
        (
            '{"operation": "saved", "organization_id": "o", "provider": "p", "id": "i", "version": "1",'
            ' "time": "2026-01-02T03:04:05Z"}',
            ResetReason.UNDESCRIBED,
        ),
        (
            '{"operation": "saved", "organization_id": "o", "provider": "p", "id": "i", "version": 1,'
            ' "time": "2026-01-02T03:04:05"}',
            ResetReason.UNDESCRIBED,
        ),
        (
            '{"operation": "saved", "organization_id": "o", "provider": "p", "id": "i", "version": 1,'
            ' "time": "yesterday"}',
            ResetReason.UNDESCRIBED,
        ),
    ],
)
def test_anything_but_a_well_formed_change_resynchronizes(payload: str, reason: ResetReason) -> None:
    # Anyone who can connect may NOTIFY the channel: never trusted, never raising.
    assert parse_notification(payload) == FeedReset(reason)


def change_payload(**fields: object) -> str:
    message: dict[str, object] = {
        "operation": "saved",
        "organization_id": "o",
        "provider": "p",
        "id": "i",
        "version": 1,
        "time": "2026-01-02T03:04:05Z",
        "rewrap": False,
    }
    return json.dumps({**message, **fields})


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("organization_id", "\ud800"),  # a lone surrogate (JSON "\ud800"): no UTF-8, so no protobuf string
        ("provider", "a\udcff"),
        ("id", "\ud800"),
        ("time", "0001-01-01T00:00:00+14:00"),  # before the first instant a protobuf Timestamp holds
        ("time", "9999-12-31T23:59:59-14:00"),  # after the last
    ],
)
def test_a_change_no_watch_message_could_carry_resynchronizes(field: str, value: str) -> None:
    # Believed, it would fail every watch stream it is in scope of, on every replica, with INTERNAL.
    assert parse_notification(change_payload(**{field: value})) == FeedReset(ResetReason.UNDESCRIBED)


_TEXT = st.one_of(st.text(max_size=20), st.sampled_from(["\ud800", "a\udcff", "", "org_1"]))
_ZONES = st.builds(timezone, st.timedeltas(min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23)))


@settings(max_examples=300, deadline=None)
@given(
    organization_id=_TEXT,
    provider=_TEXT,
    row_id=_TEXT,
    version=st.one_of(st.integers(), st.booleans(), st.floats(), st.none(), _TEXT),
    time=st.one_of(st.datetimes(timezones=_ZONES).map(datetime.isoformat), _TEXT),
    rewrap=st.one_of(st.booleans(), st.none(), st.integers()),
    operation=st.sampled_from(["saved", "deleted", "reset", "renamed"]),
)
def test_whatever_a_notification_holds_it_makes_a_watch_message_or_a_reset(
    organization_id: str, provider: str, row_id: str, version: object, time: str, rewrap: object, operation: str
) -> None:
    payload = change_payload(
        operation=operation,
        organization_id=organization_id,
        provider=provider,
        id=row_id,
        version=version,
        time=time,
        rewrap=rewrap,
    )
    event = parse_notification(payload)
    if isinstance(event, ConfigChanged):
        assert watch_event_to_pb(event).SerializeToString()
    else:
        assert event == FeedReset(ResetReason.UNDESCRIBED)
