"""The IntegrationStore contract, run against every backend (see the `store` fixture).

The PostgreSQL-only tests at the end cover what only PostgreSQL has: several
replicas migrating one database at once, adopting the dashboard's table, the
column as other readers of the database see it, and a save racing another
writer's first insert of its row.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]
import pytest

from integrations_service.store import AuditEntry, AuditRecord, IntegrationStore, KeyRecord, StoredIntegration
from integrations_service.store.memory import MemoryStore
from integrations_service.store.postgres import ROW_LOCK_NAMESPACE, PostgresStore
from integrations_service.store.sqlite import SqliteStore
from tests.integration.raw_rows import insert_raw_config

T = TypeVar("T")

ORG = "org_1"
OTHER_ORG = "org_2"


class Refused(Exception):
    """Raised by test callbacks; must come out of the store as the very same object."""


def put(values: dict[str, str]) -> Callable[[StoredIntegration | None], dict[str, str]]:
    """A mutation that merges `values` into the current config."""

    def merge(current: StoredIntegration | None) -> dict[str, str]:
        return {**(current.config if current else {}), **values}

    return merge


def refuse(error: Exception) -> Callable[[StoredIntegration | None], dict[str, str]]:
    def mutate(current: StoredIntegration | None) -> dict[str, str]:
        raise error

    return mutate


def event(action: str = "SaveIntegration", organization_id: str = ORG, **overrides: object) -> AuditRecord:
    """An audit record with every field set (overridable)."""
    values: dict[str, object] = {
        "time": datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC),
        "caller": "svc-dashboard",
        "action": action,
        "outcome": "OK",
        "organization_id": organization_id,
        "provider": "stripe",
        "fields": ("secretKey", "webhookSecret"),
        "request_id": "req-1",
        "details": {"fingerprint.secretKey": "hmac:ab12"},
    }
    values.update(overrides)
    return AuditRecord(**values)  # type: ignore[arg-type]


def append_bang(row: StoredIntegration) -> dict[str, str]:
    """A rewrite that changes every stored value (as re-encryption would)."""
    return {key: value + "!" for key, value in row.config.items()}


async def trail(store: IntegrationStore, organization_id: str = "") -> list[AuditRecord]:
    """The whole audit trail (of one organization, or everyone's), newest first."""
    return [entry.record for entry in await store.list_audit(organization_id, 0, 1000)]


async def migrate(store: IntegrationStore) -> list[int]:
    assert isinstance(store, PostgresStore | SqliteStore)
    return await store.migrate()


async def open_like(store: IntegrationStore, location: tuple[str, str]) -> IntegrationStore:
    """A second, independent store on the same database: another replica."""
    kind, where = location
    if isinstance(store, MemoryStore):
        return MemoryStore(store.database)
    return await (SqliteStore.open(where) if kind == "sqlite" else PostgresStore.connect(where))


# --- reads and writes -----------------------------------------------------------------------------


async def test_get_of_a_missing_row_is_none(store: IntegrationStore) -> None:
    assert await store.get(ORG, "stripe") is None


async def test_upsert_inserts_then_updates(store: IntegrationStore) -> None:
    first = await store.upsert(ORG, "stripe", put({"secretKey": "enc:v1:a"}))
    assert (first.organization_id, first.provider, dict(first.config)) == (ORG, "stripe", {"secretKey": "enc:v1:a"})
    assert first.version == 1
    assert first.created_at == first.updated_at
    assert first.created_at.utcoffset() == timedelta(0)

    second = await store.upsert(ORG, "stripe", put({"webhookSecret": "enc:v1:b"}))
    assert dict(second.config) == {"secretKey": "enc:v1:a", "webhookSecret": "enc:v1:b"}
    assert second.version == 2
    assert (second.id, second.created_at) == (first.id, first.created_at)
    assert second.updated_at > first.updated_at
    assert await store.get(ORG, "stripe") == second


async def test_upsert_replaces_the_config_with_what_mutate_returns(store: IntegrationStore) -> None:
    await store.upsert(ORG, "stripe", put({"secretKey": "a", "webhookSecret": "b"}))
    row = await store.upsert(ORG, "stripe", lambda current: {"publishableKey": "c"})
    assert dict(row.config) == {"publishableKey": "c"}
    assert await store.get(ORG, "stripe") == row


async def test_mutate_receives_the_current_row(store: IntegrationStore) -> None:
    seen: list[StoredIntegration | None] = []

    def record(current: StoredIntegration | None) -> dict[str, str]:
        seen.append(current)
        return {"apiKey": str(len(seen))}

    first = await store.upsert(ORG, "easypay", record)
    second = await store.upsert(ORG, "easypay", record)
    assert seen == [None, first]
    assert dict(second.config) == {"apiKey": "2"}


async def test_a_refused_update_changes_nothing(store: IntegrationStore) -> None:
    before = await store.upsert(ORG, "stripe", put({"secretKey": "a"}))
    error = Refused("stale etag")
    with pytest.raises(Refused) as raised:
        await store.upsert(ORG, "stripe", refuse(error))
    assert raised.value is error
    assert await store.get(ORG, "stripe") == before
    # The store (and its connection) is still fine afterwards.
    after = await store.upsert(ORG, "stripe", put({"secretKey": "b"}))
    assert after.version == 2


async def test_a_refused_insert_creates_nothing(store: IntegrationStore) -> None:
    with pytest.raises(Refused):
        await store.upsert(ORG, "stripe", refuse(Refused()))
    assert await store.get(ORG, "stripe") is None
    assert await store.list_for_organization(ORG) == []
    assert (await store.upsert(ORG, "stripe", put({"secretKey": "a"}))).version == 1


async def test_list_returns_only_the_organizations_rows_ordered_by_provider(store: IntegrationStore) -> None:
    for provider in ("stripe", "easypay", "ifthenpay"):
        await store.upsert(ORG, provider, put({"key": f"{ORG}/{provider}"}))
    await store.upsert(OTHER_ORG, "stripe", put({"key": f"{OTHER_ORG}/stripe"}))

    rows = await store.list_for_organization(ORG)
    assert [row.provider for row in rows] == ["easypay", "ifthenpay", "stripe"]
    assert all(row.organization_id == ORG and row.config["key"] == f"{ORG}/{row.provider}" for row in rows)
    assert [row.provider for row in await store.list_for_organization(OTHER_ORG)] == ["stripe"]
    assert await store.list_for_organization("org_without_rows") == []


async def test_organizations_never_touch_each_others_rows(store: IntegrationStore) -> None:
    mine = await store.upsert(ORG, "stripe", put({"secretKey": "mine"}))
    seen: list[StoredIntegration | None] = []

    def theirs(current: StoredIntegration | None) -> dict[str, str]:
        seen.append(current)
        return {"secretKey": "theirs"}

    other = await store.upsert(OTHER_ORG, "stripe", theirs)
    assert seen == [None]
    assert other.id != mine.id
    assert await store.get(ORG, "stripe") == mine

    assert await store.delete(OTHER_ORG, "stripe", lambda current: None) is True
    assert await store.get(ORG, "stripe") == mine


async def test_delete(store: IntegrationStore) -> None:
    checked: list[StoredIntegration] = []
    assert await store.delete(ORG, "stripe", checked.append) is False
    assert checked == []

    row = await store.upsert(ORG, "stripe", put({"secretKey": "a"}))
    assert await store.delete(ORG, "stripe", checked.append) is True
    assert checked == [row]
    assert await store.get(ORG, "stripe") is None
    assert await store.delete(ORG, "stripe", checked.append) is False


async def test_a_refused_delete_keeps_the_row(store: IntegrationStore) -> None:
    row = await store.upsert(ORG, "stripe", put({"secretKey": "a"}))
    error = Refused("stale etag")

    def check(current: StoredIntegration) -> None:
        raise error

    with pytest.raises(Refused) as raised:
        await store.delete(ORG, "stripe", check)
    assert raised.value is error
    assert await store.get(ORG, "stripe") == row


async def test_a_recreated_row_starts_over(store: IntegrationStore) -> None:
    first = await store.upsert(ORG, "stripe", put({"secretKey": "a"}))
    await store.delete(ORG, "stripe", lambda current: None)
    again = await store.upsert(ORG, "stripe", put({"secretKey": "b"}))
    assert again.version == 1
    assert again.id != first.id


async def test_values_round_trip_exactly(store: IntegrationStore) -> None:
    config = {
        "ascii": "enc:v1:AbC+/=",
        "unicode": "Olá, 世界 — ✓ 🔑 ﷽ e\u0301",
        "long": "x" * 4096,
        "long_unicode": "é🔑" * 1024,
        "quotes": '"\'`\\ {"json": [1, 2]} ; DROP TABLE integration_config; --',
        "whitespace": " \t\r\n leading and trailing \n",
        "empty": "",
        "chave_é_🔑": "the key is unicode too",
    }
    written = await store.upsert(ORG, "stripe", lambda current: config)
    assert dict(written.config) == config
    read = await store.get(ORG, "stripe")
    assert read is not None
    assert dict(read.config) == config
    assert all(type(value) is str for value in read.config.values())
    assert [dict(row.config) for row in await store.list_for_organization(ORG)] == [config]


async def test_a_non_string_value_written_behind_the_stores_back_reads_as_its_compact_json_text(
    store: IntegrationStore, contract_location: tuple[str, str]
) -> None:
    if isinstance(store, MemoryStore):
        pytest.skip("the in-memory store has no database to write to behind its back")
    written = {"secretKey": "enc:v1:a", "retries": 3, "live": True, "nested": {"olá": [1, None, "x y"]}}
    await insert_raw_config(*contract_location, ORG, "stripe", json.dumps(written))
    row = await store.get(ORG, "stripe")
    assert row is not None
    # The same text from every store: no spaces, non-ASCII kept.
    assert dict(row.config) == {
        "secretKey": "enc:v1:a",
        "retries": "3",
        "live": "true",
        "nested": '{"olá":[1,null,"x y"]}',
    }


async def test_identifiers_round_trip_exactly(store: IntegrationStore) -> None:
    organization = "org/ünïcode 'quoted'"
    await store.upsert(organization, "stripe/x", put({"k": "v"}))
    row = await store.get(organization, "stripe/x")
    assert row is not None
    assert (row.organization_id, row.provider) == (organization, "stripe/x")
    # The row lock key joins organization and provider with "/": a lookalike is still another row.
    assert await store.get("org/ünïcode 'quoted'/stripe", "x") is None


# --- concurrency ------------------------------------------------------------------------------


async def test_concurrent_upserts_lose_no_field(store: IntegrationStore) -> None:
    writers = 50
    rows = await asyncio.gather(
        *(store.upsert(ORG, "stripe", put({f"field_{i}": f"value_{i}"})) for i in range(writers))
    )
    final = await store.get(ORG, "stripe")
    assert final is not None
    assert dict(final.config) == {f"field_{i}": f"value_{i}" for i in range(writers)}
    assert final.version == writers
    assert sorted(row.version for row in rows) == list(range(1, writers + 1))


async def test_concurrent_upserts_from_two_replicas_lose_no_field(
    store: IntegrationStore, contract_location: tuple[str, str]
) -> None:
    replica = await open_like(store, contract_location)
    try:
        writers = 20
        await asyncio.gather(
            *((store if i % 2 else replica).upsert(ORG, "stripe", put({f"field_{i}": "v"})) for i in range(writers))
        )
    finally:
        await replica.close()
    final = await store.get(ORG, "stripe")
    assert final is not None
    assert set(final.config) == {f"field_{i}" for i in range(writers)}
    assert final.version == writers


async def test_concurrent_delete_and_upsert_serialize(store: IntegrationStore) -> None:
    await store.upsert(ORG, "stripe", put({"a": "1"}))
    await asyncio.gather(
        store.delete(ORG, "stripe", lambda current: None),
        store.upsert(ORG, "stripe", put({"b": "2"})),
    )
    row = await store.get(ORG, "stripe")
    # Either order is fine; a half-applied mix of both is not.
    assert row is None or dict(row.config) in ({"b": "2"}, {"a": "1", "b": "2"})


# --- audit ------------------------------------------------------------------------------------


async def test_an_audit_record_is_appended_with_an_upsert(store: IntegrationStore) -> None:
    first, second = event(request_id="req-1"), event(request_id="req-2")
    await store.upsert(ORG, "stripe", put({"secretKey": "a"}), first)
    await store.upsert(ORG, "stripe", put({"secretKey": "b"}), second)
    await store.upsert(ORG, "stripe", put({"secretKey": "c"}))  # no audit given: none appended
    assert await trail(store) == [second, first]


async def test_no_audit_record_when_mutate_raises(store: IntegrationStore) -> None:
    with pytest.raises(Refused):
        await store.upsert(ORG, "stripe", refuse(Refused()), event())
    assert await store.get(ORG, "stripe") is None
    assert await trail(store) == []

    before = await store.upsert(ORG, "stripe", put({"secretKey": "a"}))
    error = Refused("stale etag")
    with pytest.raises(Refused) as raised:
        await store.upsert(ORG, "stripe", refuse(error), event())
    assert raised.value is error
    assert await store.get(ORG, "stripe") == before
    assert await trail(store) == []


async def test_an_audit_record_is_appended_with_a_delete_only_when_a_row_was_deleted(
    store: IntegrationStore,
) -> None:
    assert await store.delete(ORG, "stripe", lambda current: None, event("DeleteIntegration")) is False
    assert await trail(store) == []

    row = await store.upsert(ORG, "stripe", put({"secretKey": "a"}))

    def check(current: StoredIntegration) -> None:
        raise Refused("stale etag")

    with pytest.raises(Refused):
        await store.delete(ORG, "stripe", check, event("DeleteIntegration", request_id="refused"))
    assert await store.get(ORG, "stripe") == row
    assert await trail(store) == []

    deleted = event("DeleteIntegration", request_id="deleted")
    assert await store.delete(ORG, "stripe", lambda current: None, deleted) is True
    assert await trail(store) == [deleted]


async def test_audit_records_round_trip_exactly(store: IntegrationStore) -> None:
    lisbon_summer = timezone(timedelta(hours=1))
    full = event(
        time=datetime(2024, 7, 1, 13, 30, 15, 654321, tzinfo=lisbon_summer),
        caller="spiffe://prod/ns/dash/sa/dashboard",
        organization_id="org/ünïcode 'quoted'",
        provider="stripe/x",
        fields=("chave_é_🔑", "secretKey"),
        request_id="\"'; DROP TABLE audit_events; --",
        details={"reason": "Olá 世界 ✓", "count": "12", "": ""},
    )
    bare = AuditRecord(time=datetime(2024, 7, 1, 12, 0, tzinfo=UTC), caller="cli", action="Rotate", outcome="OK")
    await store.append_audit([full, bare])

    newest, oldest = await trail(store)
    assert (oldest, newest) == (full, bare)
    assert oldest.time == datetime(2024, 7, 1, 12, 30, 15, 654321, tzinfo=UTC)
    assert oldest.time.utcoffset() == timedelta(0)
    assert type(oldest.fields) is tuple
    assert dict(oldest.details) == {"reason": "Olá 世界 ✓", "count": "12", "": ""}
    assert (newest.organization_id, newest.provider, newest.fields, dict(newest.details)) == ("", "", (), {})


async def test_list_audit_pages_newest_first_and_filters_by_organization(store: IntegrationStore) -> None:
    records = [event(organization_id=ORG if i % 3 else OTHER_ORG, request_id=f"req-{i}") for i in range(10)]
    await store.append_audit(records[:4])
    for record in records[4:]:
        await store.append_audit([record])

    everything = await store.list_audit("", 0, 100)
    assert [entry.record for entry in everything] == records[::-1]
    ids = [entry.id for entry in everything]
    assert ids == sorted(ids, reverse=True)
    assert len(set(ids)) == len(ids)

    async def pages(organization_id: str, limit: int) -> list[list[AuditEntry]]:
        found: list[list[AuditEntry]] = []
        before = 0
        while page := await store.list_audit(organization_id, before, limit):
            assert len(page) <= limit
            found.append(page)
            before = page[-1].id
        return found

    paged = await pages("", 3)
    assert [len(page) for page in paged] == [3, 3, 3, 1]
    assert [entry for page in paged for entry in page] == everything

    mine = await pages(ORG, 2)
    assert [entry.record for page in mine for entry in page] == [r for r in records[::-1] if r.organization_id == ORG]
    theirs = await store.list_audit(OTHER_ORG, 0, 100)
    assert [entry.record for entry in theirs] == [r for r in records[::-1] if r.organization_id == OTHER_ORG]
    assert await store.list_audit("org_without_events", 0, 100) == []
    # before_id is exclusive.
    assert await store.list_audit("", everything[2].id, 2) == everything[3:5]
    assert await store.list_audit("", everything[-1].id, 2) == []


async def test_a_flush_sized_batch_is_stored_whole_and_in_order(store: IntegrationStore) -> None:
    # A flush of a busy second: thousands of decrypted reads' records in one append.
    records = [event(request_id=f"req-{i}", time=datetime(2026, 12, 1, 12, 0, 0, i, tzinfo=UTC)) for i in range(2500)]
    await store.append_audit(records)
    assert await trail(store) == records[:-1001:-1]  # trail() reads the newest 1000
    everything = await store.list_audit("", 0, 3000)
    assert [entry.record for entry in everything] == records[::-1]


async def test_audit_ids_grow_with_every_record(store: IntegrationStore) -> None:
    await store.append_audit([event(request_id="a")])
    [first] = await store.list_audit("", 0, 1)
    await store.upsert(ORG, "stripe", put({"k": "v"}), event(request_id="b"))
    [second] = await store.list_audit("", 0, 1)
    assert second.id > first.id
    assert second.record.request_id == "b"


async def test_appending_no_audit_records_does_not_touch_the_database(
    store: IntegrationStore, contract_location: tuple[str, str]
) -> None:
    await store.append_audit([])
    assert await trail(store) == []
    closed = await open_like(store, contract_location)
    await closed.close()
    await closed.append_audit([])  # a closed store would fail any database call


# --- rotation ---------------------------------------------------------------------------------


async def test_scan_pages_in_id_order_and_covers_every_row_exactly_once(store: IntegrationStore) -> None:
    written = {}
    for i in range(23):
        row = await store.upsert(f"org_{i % 4}", f"provider_{i}", put({"k": f"v{i}"}))
        written[row.id] = row
    await store.upsert("org_0", "provider_0", put({"k": "updated"}))
    written = {row.id: row for row in [await store.get(r.organization_id, r.provider) for r in written.values()] if row}

    seen: list[StoredIntegration] = []
    after = ""
    while page := await store.scan(after, 5):
        assert len(page) <= 5
        seen.extend(page)
        after = page[-1].id
    assert [row.id for row in seen] == sorted(written)
    assert {row.id: row for row in seen} == written
    assert await store.scan(max(written), 5) == []
    assert await store.scan("", 0) == []


async def test_scan_of_an_empty_store_is_empty(store: IntegrationStore) -> None:
    assert await store.scan("", 10) == []


async def test_rewrap_changes_the_config_but_not_the_version_or_update_time(store: IntegrationStore) -> None:
    await store.upsert(ORG, "stripe", put({"secretKey": "a"}))
    first = await store.upsert(ORG, "stripe", put({"webhookSecret": "b"}))
    second = await store.upsert(OTHER_ORG, "stripe", put({"secretKey": "c"}))
    seen: list[StoredIntegration] = []

    def rewrite(row: StoredIntegration) -> dict[str, str]:
        seen.append(row)
        return append_bang(row)

    assert await store.rewrap([second.id, first.id], rewrite) == 2
    assert sorted(seen, key=lambda row: row.id) == sorted([first, second], key=lambda row: row.id)
    for before in (first, second):
        after = await store.get(before.organization_id, before.provider)
        assert after is not None
        assert dict(after.config) == {key: value + "!" for key, value in before.config.items()}
        assert (after.id, after.version, after.created_at, after.updated_at) == (
            before.id,
            before.version,
            before.created_at,
            before.updated_at,
        )
    # The next save still bumps the version by one.
    assert (await store.upsert(ORG, "stripe", put({"x": "y"}))).version == first.version + 1


async def test_rewrap_skips_rows_left_alone_and_rows_that_are_gone(store: IntegrationStore) -> None:
    kept = await store.upsert(ORG, "stripe", put({"k": "kept"}))
    changed = await store.upsert(ORG, "easypay", put({"k": "changed"}))
    gone = await store.upsert(ORG, "ifthenpay", put({"k": "gone"}))
    assert await store.delete(ORG, "ifthenpay", lambda current: None)
    seen: list[str] = []

    def rewrite(row: StoredIntegration) -> dict[str, str] | None:
        seen.append(row.id)
        return None if row.id == kept.id else append_bang(row)

    assert await store.rewrap([kept.id, changed.id, gone.id, "no-such-id", changed.id], rewrite) == 1
    assert sorted(seen) == sorted([kept.id, changed.id])
    assert await store.get(ORG, "stripe") == kept
    after = await store.get(ORG, "easypay")
    assert after is not None
    assert dict(after.config) == {"k": "changed!"}
    assert await store.get(ORG, "ifthenpay") is None
    assert await store.rewrap([], append_bang) == 0
    assert await store.rewrap([gone.id], append_bang) == 0


async def test_a_failed_rewrap_changes_nothing(store: IntegrationStore) -> None:
    rows = [await store.upsert(ORG, provider, put({"k": provider})) for provider in ("a", "b", "c")]
    error = Refused("wrong key")
    calls: list[str] = []

    def rewrite(row: StoredIntegration) -> dict[str, str]:
        calls.append(row.id)
        if len(calls) == 2:
            raise error
        return append_bang(row)

    with pytest.raises(Refused) as raised:
        await store.rewrap([row.id for row in rows], rewrite, event("RotateKeys"))
    assert raised.value is error
    assert calls[:2] == sorted(row.id for row in rows)[:2]
    assert [await store.get(ORG, row.provider) for row in rows] == rows
    assert await trail(store) == []
    # The store (and its connection) is still fine afterwards.
    assert await store.rewrap([row.id for row in rows], append_bang) == 3


async def test_an_audit_record_is_appended_with_a_rewrap(store: IntegrationStore) -> None:
    row = await store.upsert(ORG, "stripe", put({"k": "v"}))
    record = event("RotateKeys", organization_id="", provider="", fields=(), details={"rows": "1"})
    assert await store.rewrap([row.id], append_bang, record) == 1
    assert await trail(store) == [record]


async def test_concurrent_upserts_and_rewraps_of_one_row_lose_nothing(store: IntegrationStore) -> None:
    row = await store.upsert(ORG, "stripe", put({"base": "v"}))
    writers = 20
    results = await asyncio.gather(
        *(
            call
            for i in range(writers)
            for call in (
                store.upsert(ORG, "stripe", put({f"field_{i}": "v"})),
                store.rewrap([row.id], append_bang),
            )
        )
    )
    final = await store.get(ORG, "stripe")
    assert final is not None
    assert set(final.config) == {"base"} | {f"field_{i}" for i in range(writers)}
    assert all(re.fullmatch(r"v!*", value) for value in final.config.values()), final.config
    assert final.config["base"] == "v" + "!" * writers
    assert final.version == writers + 1
    assert [result for result in results if isinstance(result, int)] == [1] * writers


# --- keys -------------------------------------------------------------------------------------


def keys_by_id(records: list[KeyRecord]) -> Mapping[str, KeyRecord]:
    assert len({record.key_id for record in records}) == len(records)
    return {record.key_id: record for record in records}


async def test_register_keys_records_new_keys_once(store: IntegrationStore) -> None:
    assert await store.register_keys({}) == []
    first = await store.register_keys({"k2": "check-2", "k1": "check-1"})
    assert sorted(first, key=lambda key: key.key_id) == [
        KeyRecord("k1", "check-1", 0, retired=False),
        KeyRecord("k2", "check-2", 0, retired=False),
    ]
    assert keys_by_id(await store.register_keys({"k1": "check-1", "k2": "check-2"})) == keys_by_id(first)
    # A known key keeps its stored check value (the caller compares); new ones are added.
    again = keys_by_id(await store.register_keys({"k1": "a-different-check", "k3": "check-3"}))
    assert again == {
        "k1": KeyRecord("k1", "check-1", 0, retired=False),
        "k2": KeyRecord("k2", "check-2", 0, retired=False),
        "k3": KeyRecord("k3", "check-3", 0, retired=False),
    }
    assert keys_by_id(await store.register_keys({})) == again


async def test_list_keys_reads_every_key_in_id_order_and_changes_nothing(store: IntegrationStore) -> None:
    assert await store.list_keys() == []
    assert await store.list_keys() == []  # reading registered nothing
    await store.register_keys({"k2": "check-2", "k1": "check-1", "k10": "check-10"})
    await store.add_encryptions({"k2": 3})
    await store.retire_key("k1")
    assert await store.list_keys() == [
        KeyRecord("k1", "check-1", 0, retired=True),
        KeyRecord("k10", "check-10", 0, retired=False),
        KeyRecord("k2", "check-2", 3, retired=False),
    ]
    assert await store.list_keys() == await store.register_keys({})


async def test_add_encryptions_accumulates(store: IntegrationStore) -> None:
    await store.register_keys({"k1": "c1", "k2": "c2"})
    await store.add_encryptions({"k1": 3})
    await store.add_encryptions({"k1": 4, "k2": 1, "unknown": 5})
    await store.add_encryptions({})
    await store.add_encryptions({"k2": 0})
    keys = keys_by_id(await store.list_keys())
    assert {key_id: key.encryptions for key_id, key in keys.items()} == {"k1": 7, "k2": 1}
    big = 2**40
    await store.add_encryptions({"k1": big})
    assert keys_by_id(await store.list_keys())["k1"].encryptions == big + 7


async def test_concurrent_key_registrations_and_counts_all_land(store: IntegrationStore) -> None:
    callers = 10
    await asyncio.gather(*(store.register_keys({"a": "ca", "b": "cb", "c": "cc"}) for _ in range(callers)))
    # Each caller names the keys in another order: the store must not deadlock on them.
    orders = [{"c": 1, "a": 2, "b": 3}, {"b": 3, "a": 2, "c": 1}]
    await asyncio.gather(*(store.add_encryptions(orders[i % 2]) for i in range(callers)))
    keys = keys_by_id(await store.list_keys())
    assert {key_id: key.encryptions for key_id, key in keys.items()} == {"a": 20, "b": 30, "c": 10}


async def test_retire_key_marks_the_key_retired(store: IntegrationStore) -> None:
    await store.register_keys({"old": "c-old", "new": "c-new"})
    await store.add_encryptions({"old": 5})
    await store.retire_key("old")
    await store.retire_key("old")  # idempotent
    await store.retire_key("unknown")  # nothing to retire
    keys = keys_by_id(await store.register_keys({"old": "ignored"}))
    assert keys == {
        "old": KeyRecord("old", "c-old", 5, retired=True),
        "new": KeyRecord("new", "c-new", 0, retired=False),
    }


# --- migrations -------------------------------------------------------------------------------


async def test_migrating_again_applies_nothing(store: IntegrationStore) -> None:
    if isinstance(store, MemoryStore):
        pytest.skip("the in-memory store has no schema to migrate")
    assert await migrate(store) == []
    assert await migrate(store) == []


async def test_a_new_sqlite_file_is_migrated_once(tmp_path: Path) -> None:
    path = f"{tmp_path}/new.sqlite3"
    store = await SqliteStore.open(path, migrate=False)
    try:
        assert await store.migrate() == [1, 2]
        assert await store.migrate() == []
    finally:
        await store.close()
    reopened = await SqliteStore.open(path)
    try:
        assert await reopened.migrate() == []
        assert await reopened.get(ORG, "stripe") is None
    finally:
        await reopened.close()


# --- PostgreSQL only --------------------------------------------------------------------------

DASHBOARD_TABLE = """
CREATE TABLE integration_config (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    config JSONB NOT NULL,
    created_at TIMESTAMPTZ,
    updated_at TIMESTAMPTZ,
    UNIQUE (organization_id, provider)
)
"""


async def _raw(url: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(query, *args)  # type: ignore[no-any-return]
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_replicas_migrating_a_new_database_at_once_both_succeed(
    postgres_database_factory: Callable[[], Awaitable[str]],
) -> None:
    url = await postgres_database_factory()
    first = await PostgresStore.connect(url, migrate=False)
    second = await PostgresStore.connect(url, migrate=False)
    try:
        results = await asyncio.gather(first.migrate(), second.migrate())
        assert sorted(results) == [[], [1, 2, 3, 4, 5, 6]]
        assert await first.migrate() == []
        assert (await second.upsert(ORG, "stripe", put({"k": "v"}))).version == 1
    finally:
        await first.close()
        await second.close()
    ledger = await _raw(url, "SELECT version, name FROM schema_migrations")
    assert sorted(tuple(row) for row in ledger) == [
        (1, "integration_config"),
        (2, "keys_and_audit"),
        (3, "change_feed"),
        (4, "change_feed_rewrap"),
        (5, "save_if_unchanged"),
        (6, "change_feed_moved_rows"),
    ]


@pytest.mark.postgres
async def test_replicas_connecting_to_a_new_database_at_once_both_start(
    postgres_database_factory: Callable[[], Awaitable[str]],
) -> None:
    url = await postgres_database_factory()
    stores = await asyncio.gather(*(PostgresStore.connect(url) for _ in range(4)))
    try:
        assert [await store.migrate() for store in stores] == [[], [], [], []]
    finally:
        await asyncio.gather(*(store.close() for store in stores))


@pytest.mark.postgres
async def test_the_dashboards_existing_table_and_rows_are_adopted(
    postgres_database_factory: Callable[[], Awaitable[str]],
) -> None:
    url = await postgres_database_factory()
    await _raw(url, DASHBOARD_TABLE)
    await _raw(
        url,
        "INSERT INTO integration_config (id, organization_id, provider, config) VALUES ($1, $2, $3, $4)",
        "dash-1",
        ORG,
        "stripe",
        json.dumps({"secretKey": "enc:v1:from-dashboard"}),
    )
    store = await PostgresStore.connect(url)
    try:
        row = await store.get(ORG, "stripe")
        assert row is not None
        assert (row.id, row.version, dict(row.config)) == ("dash-1", 1, {"secretKey": "enc:v1:from-dashboard"})
        assert row.created_at.tzinfo is not None
        assert row.updated_at == row.created_at
        updated = await store.upsert(ORG, "stripe", put({"apiKey": "x"}))
        assert (updated.id, updated.version) == ("dash-1", 2)
    finally:
        await store.close()


@pytest.mark.postgres
async def test_the_config_column_holds_exactly_what_was_upserted(
    postgres_store: PostgresStore, postgres_database_url: str
) -> None:
    config = {"secretKey": "enc:v1:Zm9v", "unicode": "Olá 🔑", "long": "y" * 4096}
    row = await postgres_store.upsert(ORG, "stripe", lambda current: config)
    [raw] = await _raw(
        postgres_database_url,
        "SELECT id, config::text AS config, jsonb_typeof(config) AS kind, version "
        "FROM integration_config WHERE organization_id = $1 AND provider = $2",
        ORG,
        "stripe",
    )
    assert raw["kind"] == "object"
    assert json.loads(raw["config"]) == config
    assert (raw["id"], raw["version"]) == (row.id, 1)


_WAITING_ON_A_LOCK = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
)


async def _until_waiting_on_a_lock(watcher: asyncpg.Connection, call: asyncio.Task[StoredIntegration]) -> None:
    """Until a backend of this database waits on a lock, or `call` is over."""
    async with asyncio.timeout(4):
        while not call.done():
            if await watcher.fetchval(_WAITING_ON_A_LOCK):
                return
            await asyncio.sleep(0.01)


async def _save_while_another_writer_inserts(
    store: PostgresStore, url: str, *, holding_the_row_lock: bool
) -> tuple[StoredIntegration, list[StoredIntegration | None]]:
    """Save a field of ORG/stripe while another writer's insert of that new row is not committed yet.

    The other writer is the dashboard (which knows nothing of the row lock) or,
    `holding_the_row_lock`, another replica mid-way through its first save. It
    commits once the save waits on a lock. Returns the saved row and the
    `current` that each run of the save's mutate was given.
    """
    seen: list[StoredIntegration | None] = []

    def merge(current: StoredIntegration | None) -> dict[str, str]:
        seen.append(current)
        return {**(current.config if current else {}), "secretKey": "enc:v1:service"}

    other = await asyncpg.connect(url)
    watcher = await asyncpg.connect(url)
    try:
        async with other.transaction():
            if holding_the_row_lock:
                await other.execute(
                    "SELECT pg_advisory_xact_lock($1::int4, hashtext($2 || '/' || $3))",
                    ROW_LOCK_NAMESPACE,
                    ORG,
                    "stripe",
                )
            await other.execute(
                "INSERT INTO integration_config (id, organization_id, provider, config) VALUES ($1, $2, $3, $4)",
                "other-1",
                ORG,
                "stripe",
                json.dumps({"publishableKey": "pk_other"}),
            )
            save = asyncio.create_task(store.upsert(ORG, "stripe", merge))
            # The save waits on the row lock, or (past it, having read no row) on the other insert's key.
            await _until_waiting_on_a_lock(watcher, save)
        return await save, seen
    finally:
        await other.close()
        await watcher.close()


@pytest.mark.postgres
async def test_a_save_racing_an_insert_that_bypasses_the_row_lock_starts_over_and_keeps_both(
    postgres_store: PostgresStore, postgres_database_url: str
) -> None:
    row, seen = await _save_while_another_writer_inserts(
        postgres_store, postgres_database_url, holding_the_row_lock=False
    )
    # The save read no row, then its insert collided with the dashboard's: it ran again on that row.
    assert seen[0] is None
    assert [dict(current.config) for current in seen[1:] if current is not None] == [{"publishableKey": "pk_other"}]
    assert (row.id, row.version, dict(row.config)) == (
        "other-1",
        2,
        {"publishableKey": "pk_other", "secretKey": "enc:v1:service"},
    )
    assert await postgres_store.get(ORG, "stripe") == row


@pytest.mark.postgres
async def test_a_first_save_waits_for_another_replicas_first_save_of_the_row_and_runs_once_on_it(
    postgres_store: PostgresStore, postgres_database_url: str
) -> None:
    row, seen = await _save_while_another_writer_inserts(
        postgres_store, postgres_database_url, holding_the_row_lock=True
    )
    # Held off by the row lock until the other first save committed: one run, on that save's row.
    assert [dict(current.config) if current is not None else None for current in seen] == [
        {"publishableKey": "pk_other"}
    ]
    assert (row.id, row.version, dict(row.config)) == (
        "other-1",
        2,
        {"publishableKey": "pk_other", "secretKey": "enc:v1:service"},
    )


# --- the optimistic save (PostgreSQL) ---------------------------------------------------------------
#
# A save of an existing row runs its merge on the row as this store last wrote it, then writes in one
# statement only if the row is still that version. These tests change the row behind the store's back
# (SQL, another replica) between the row the merge is given and the write, and check that the write
# notices, that the merge runs again on the row as stored, and that nothing is lost.


class SideWriter:
    """A connection of its own, on a thread of its own, that a merge (a plain function) can call into.

    Blocks the caller's event loop while it runs: for a merge that changes the row from SQL between
    the moment the store hands it a row and the store's write.
    """

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        # lock_timeout: a mistake in a test must not wait forever with the caller's loop blocked.
        self._conn: asyncpg.Connection = self._run(asyncpg.connect(url, server_settings={"lock_timeout": "3000"}))

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=10)

    def execute(self, statement: str, *args: object) -> str:
        return str(self._run(self._conn.execute(statement, *args)))

    def close(self) -> None:
        self._run(self._conn.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


_ADD_FIELD_FROM_SQL = (
    # As the dashboard's own code would: it changes the config and knows nothing of the version
    # (migration 0004's trigger moves the version for it).
    "UPDATE integration_config SET config = config || jsonb_build_object($2::text, 'enc:v1:sql') WHERE id = $1"
)


def recording(values: dict[str, str], seen: list[StoredIntegration | None]) -> Callable[..., dict[str, str]]:
    def merge(current: StoredIntegration | None) -> dict[str, str]:
        seen.append(current)
        return {**(current.config if current else {}), **values}

    return merge


@pytest.mark.postgres
async def test_a_save_of_a_row_changed_since_this_store_wrote_it_merges_again_onto_the_row_as_stored(
    postgres_store: PostgresStore, postgres_database_url: str
) -> None:
    first = await postgres_store.upsert(ORG, "stripe", put({"secretKey": "enc:v1:a"}))
    await _raw(postgres_database_url, _ADD_FIELD_FROM_SQL, first.id, "webhookSecret")
    seen: list[StoredIntegration | None] = []
    record = event(request_id="req-after-sql")

    row = await postgres_store.upsert(ORG, "stripe", recording({"publishableKey": "enc:v1:b"}, seen), record)

    # First on the row as this store wrote it; that write found the row changed and wrote nothing;
    # then on the row as SQL left it.
    assert [dict(current.config) for current in seen if current is not None] == [
        {"secretKey": "enc:v1:a"},
        {"secretKey": "enc:v1:a", "webhookSecret": "enc:v1:sql"},
    ]
    assert dict(row.config) == {"secretKey": "enc:v1:a", "webhookSecret": "enc:v1:sql", "publishableKey": "enc:v1:b"}
    assert (row.id, row.version) == (first.id, 3)  # the SQL change moved it to 2 (migration 0004), the save to 3
    assert await postgres_store.get(ORG, "stripe") == row
    assert await trail(postgres_store) == [record]  # one save, one record


@pytest.mark.postgres
async def test_a_save_of_a_row_rewrapped_since_this_store_wrote_it_merges_again_onto_the_rewrapped_row(
    postgres_store: PostgresStore, postgres_database_url: str
) -> None:
    # A rewrap keeps the version: only the row's xmin tells the remembered row is not the stored one.
    first = await postgres_store.upsert(ORG, "stripe", put({"secretKey": "enc:v1:a"}))
    rewrapped = await PostgresStore.connect(postgres_database_url)
    try:
        assert await rewrapped.rewrap([first.id], lambda current: {"secretKey": "enc:v2:a"}) == 1
    finally:
        await rewrapped.close()
    seen: list[StoredIntegration | None] = []

    row = await postgres_store.upsert(ORG, "stripe", recording({"publishableKey": "enc:v1:b"}, seen), event())

    assert [dict(current.config) for current in seen if current is not None] == [
        {"secretKey": "enc:v1:a"},
        {"secretKey": "enc:v2:a"},
    ]
    assert dict(row.config) == {"secretKey": "enc:v2:a", "publishableKey": "enc:v1:b"}
    assert (row.id, row.version) == (first.id, 2)


@pytest.mark.postgres
async def test_a_row_changed_between_the_merge_and_the_write_is_merged_again_then_written_under_the_row_lock(
    postgres_store: PostgresStore, postgres_database_url: str
) -> None:
    await postgres_store.upsert(ORG, "stripe", put({"base": "enc:v1:base"}))
    side = SideWriter(postgres_database_url)
    seen: list[dict[str, str]] = []
    locked_while_merging: list[bool] = []

    def merge(current: StoredIntegration | None) -> dict[str, str]:
        assert current is not None
        seen.append(dict(current.config))
        runs = len(seen)
        try:
            side.execute("SELECT 1 FROM integration_config WHERE id = $1 FOR UPDATE NOWAIT", current.id)
            locked_while_merging.append(False)
        except asyncpg.LockNotAvailableError:
            locked_while_merging.append(True)
        if runs <= 3:
            # Another writer changes the row after the store handed it to this merge, before its write.
            side.execute(_ADD_FIELD_FROM_SQL, current.id, f"sql_{runs}")
        return {**current.config, "ours": "enc:v1:ours"}

    try:
        row = await postgres_store.upsert(ORG, "stripe", merge, event())
    finally:
        side.close()

    # Three optimistic writes found the row changed each time; the fourth run held the row lock.
    assert [sorted(config) for config in seen] == [
        ["base"],
        ["base", "sql_1"],
        ["base", "sql_1", "sql_2"],
        ["base", "sql_1", "sql_2", "sql_3"],
    ]
    assert locked_while_merging == [False, False, False, True]
    assert sorted(row.config) == ["base", "ours", "sql_1", "sql_2", "sql_3"]
    assert row.version == 5  # three SQL changes (their versions moved by migration 0004's trigger), then the save
    assert await postgres_store.get(ORG, "stripe") == row
    assert await trail(postgres_store) == [event()]


def expect_version(version: int, values: dict[str, str]) -> Callable[[StoredIntegration | None], dict[str, str]]:
    """An etag check: refuses unless the current row is at `version`."""

    def merge(current: StoredIntegration | None) -> dict[str, str]:
        if current is None or current.version != version:
            raise Refused(f"stale: wanted version {version}")
        return {**current.config, **values}

    return merge


@pytest.mark.postgres
async def test_an_etag_check_is_decided_on_the_row_as_stored_not_on_the_row_this_store_last_wrote(
    postgres_store: PostgresStore, postgres_database_url: str
) -> None:
    await postgres_store.upsert(ORG, "stripe", put({"a": "1"}))  # this store remembers version 1
    replica = await PostgresStore.connect(postgres_database_url)
    try:
        assert (await replica.upsert(ORG, "stripe", put({"b": "2"}))).version == 2
    finally:
        await replica.close()

    # The caller read version 2 elsewhere: its check passes on the row as stored.
    row = await postgres_store.upsert(ORG, "stripe", expect_version(2, {"c": "3"}), event(request_id="req-ok"))
    assert (row.version, dict(row.config)) == (3, {"a": "1", "b": "2", "c": "3"})
    # A check that fails on the row as stored is final, whatever this store remembered.
    with pytest.raises(Refused):
        await postgres_store.upsert(ORG, "stripe", expect_version(2, {"d": "4"}), event(request_id="req-stale"))
    assert await postgres_store.get(ORG, "stripe") == row
    assert [record.request_id for record in await trail(postgres_store)] == ["req-ok"]
