"""The audit buffer's accounting, on an in-memory store that the test can hold up or make refuse records.

Every record enqueued is, at any moment, exactly one of: stored, waiting (buffered or in flight), dropped
(counted), or failed (counted). Nothing disappears uncounted, whatever the store does during a flush.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import cast

import pytest

from integrations_service.domain.audit import AuditTrail, Caller
from integrations_service.errors import StoreRejected, Unavailable
from integrations_service.store import AuditRecord, IntegrationStore

CAP = 100
POISON = "poison"


class MemoryAuditStore:
    """Only what AuditTrail uses: append_audit, which the test can hold on an Event, or make fail."""

    def __init__(self) -> None:
        self.stored: list[AuditRecord] = []
        self.release = asyncio.Event()
        self.release.set()
        self.entered = asyncio.Event()
        self.down = False
        self.calls = 0

    async def append_audit(self, records: Sequence[AuditRecord]) -> None:
        self.calls += 1
        self.entered.set()
        await self.release.wait()
        if self.down:
            raise Unavailable("the store is down")
        if any(record.request_id.startswith(POISON) for record in records):
            raise StoreRejected("the store refused a record of the batch")
        self.stored.extend(records)


def trail(store: MemoryAuditStore) -> AuditTrail:
    return AuditTrail(cast(IntegrationStore, store), max_buffered=CAP)


def add(audit: AuditTrail, label: str, count: int) -> list[str]:
    ids = [f"{label}-{i}" for i in range(count)]
    for request_id in ids:
        audit.enqueue(audit.record(Caller("tester", request_id), "GetProviderConfig", "OK", "org_1", "stripe"))
    return ids


def stored_ids(store: MemoryAuditStore) -> list[str]:
    return [record.request_id for record in store.stored]


async def test_records_that_arrive_while_a_flush_of_a_full_buffer_is_in_flight_are_all_accounted_for() -> None:
    store = MemoryAuditStore()
    audit = trail(store)
    first = add(audit, "first", CAP)  # the buffer is full
    store.release.clear()
    store.entered.clear()
    flushing = asyncio.ensure_future(audit.flush())
    await store.entered.wait()  # the full buffer's batch is in flight
    during = add(audit, "during", 120)
    assert audit.buffered == CAP + CAP  # in flight + waiting
    store.release.set()
    await flushing

    # The 20 oldest of those that arrived during the flush were dropped to keep the cap, and counted.
    assert audit.dropped == 20
    assert stored_ids(store) == first
    await audit.flush()
    assert stored_ids(store) == first + during[20:]
    assert audit.buffered == 0
    assert len(store.stored) + audit.dropped == len(first) + len(during)


async def test_a_flush_that_finds_the_store_down_puts_its_batch_back_in_front_within_the_cap() -> None:
    store = MemoryAuditStore()
    audit = trail(store)
    first = add(audit, "first", 60)
    store.release.clear()
    store.entered.clear()
    store.down = True
    flushing = asyncio.ensure_future(audit.flush())
    await store.entered.wait()
    during = add(audit, "during", 70)
    store.release.set()
    await flushing

    # 130 wait for a cap of 100: the 30 oldest (of the batch that was put back) are dropped, and counted.
    assert audit.buffered == CAP
    assert audit.dropped == 30
    store.down = False
    await audit.flush()
    assert stored_ids(store) == first[30:] + during
    assert len(store.stored) + audit.dropped == len(first) + len(during)


async def test_one_record_the_store_refuses_does_not_block_the_others_and_is_counted_once() -> None:
    store = MemoryAuditStore()
    audit = trail(store)
    before = add(audit, "before", 40)
    add(audit, POISON, 1)
    after = add(audit, "after", 23)
    await audit.flush()

    assert stored_ids(store) == before + after
    assert audit.failed == 1
    assert audit.buffered == 0
    calls = store.calls
    await audit.flush()  # nothing is retried
    assert store.calls == calls
    # Splitting in halves: a few store calls per bad record, not one per record.
    assert calls <= 2 * 7 + 1


async def test_every_bad_record_of_a_batch_is_given_up_and_every_good_one_stored() -> None:
    store = MemoryAuditStore()
    audit = trail(store)
    expected: list[str] = []
    for i in range(10):
        expected += add(audit, f"good{i}", 7)
        add(audit, f"{POISON}{i}", 1)
    await audit.flush()
    assert stored_ids(store) == expected
    assert audit.failed == 10
    assert audit.buffered == 0


async def test_a_flush_cancelled_mid_way_keeps_its_batch_for_the_next_one() -> None:
    store = MemoryAuditStore()
    audit = trail(store)
    first = add(audit, "first", 5)
    store.release.clear()
    store.entered.clear()
    flushing = asyncio.ensure_future(audit.flush())
    await store.entered.wait()
    flushing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flushing
    assert audit.buffered == 5
    store.release.set()
    await audit.flush()
    assert stored_ids(store) == first
    assert audit.dropped == audit.failed == 0


async def test_records_left_when_the_final_flush_fails_are_logged_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryAuditStore()
    audit = trail(store)
    add(audit, "lost", 3)
    store.down = True
    await audit.close()  # must not raise: shutdown goes on
    assert audit.failed == 3
    assert audit.buffered == 0
    assert any(getattr(r, "event", None) == "audit_lost" and getattr(r, "count", None) == 3 for r in caplog.records)


async def test_hostile_request_text_is_bounded_in_the_record_and_legitimate_text_unchanged() -> None:
    audit = trail(MemoryAuditStore())
    huge = "o" * 12_000
    record = audit.record(
        Caller("spiffe://shop.example/x" + "y" * 5000, "rid-1"),
        "SaveIntegration",
        "InvalidArgument",
        huge,
        "stri\x00pe",
        ["secret\nKey", "k" * 1000],
        {"reason": "r" * 50_000},
    )
    assert len(record.organization_id) < 200
    assert record.organization_id.startswith("o" * 100)
    assert record.organization_id.endswith("…[+11840 chars]")
    assert record.provider == "stri\\x00pe"
    assert "secret\\x0aKey" in record.fields
    assert all(len(key) < 200 for key in record.fields)
    assert len(record.caller) < 2100
    assert len(record.details["reason"]) < 1100
    legit = audit.record(
        Caller("spiffe://shop.example/commerce", "rid-2"),
        "GetProviderConfig",
        "OK",
        "org_0a1b2c",
        "stripe",
        ["secretKey", "publishableKey"],
        {"fingerprint.secretKey": "hmac-sha256:abc"},
    )
    assert (legit.caller, legit.organization_id, legit.provider) == (
        "spiffe://shop.example/commerce",
        "org_0a1b2c",
        "stripe",
    )
    assert legit.fields == ("publishableKey", "secretKey")
    assert legit.details == {"fingerprint.secretKey": "hmac-sha256:abc"}
    assert legit.request_id == "rid-2"
