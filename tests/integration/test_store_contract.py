"""The IntegrationStore contract, run against every backend (see the `store` fixture).

The PostgreSQL-only tests at the end cover what only PostgreSQL has: several
replicas migrating one database at once, adopting the dashboard's table, and the
column as other readers of the database see it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest
from integrations_service.store import IntegrationStore, StoredIntegration
from integrations_service.store.postgres import PostgresStore
from integrations_service.store.sqlite import SqliteStore

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


async def migrate(store: IntegrationStore) -> list[int]:
    assert isinstance(store, PostgresStore | SqliteStore)
    return await store.migrate()


async def open_like(store: IntegrationStore, location: tuple[str, str]) -> IntegrationStore:
    """A second, independent store on the same database: another replica."""
    kind, where = location
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
        "quotes": "\"'`\\ {\"json\": [1, 2]} ; DROP TABLE integration_config; --",
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
    store: IntegrationStore, store_location: tuple[str, str]
) -> None:
    replica = await open_like(store, store_location)
    try:
        writers = 20
        await asyncio.gather(
            *(
                (store if i % 2 else replica).upsert(ORG, "stripe", put({f"field_{i}": "v"}))
                for i in range(writers)
            )
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


# --- migrations -------------------------------------------------------------------------------


async def test_migrating_again_applies_nothing(store: IntegrationStore) -> None:
    assert await migrate(store) == []
    assert await migrate(store) == []


async def test_a_new_sqlite_file_is_migrated_once(tmp_path: Path) -> None:
    path = f"{tmp_path}/new.sqlite3"
    store = await SqliteStore.open(path, migrate=False)
    try:
        assert await store.migrate() == [1]
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
        assert sorted(results) == [[], [1]]
        assert await first.migrate() == []
        assert (await second.upsert(ORG, "stripe", put({"k": "v"}))).version == 1
    finally:
        await first.close()
        await second.close()
    ledger = await _raw(url, "SELECT version, name FROM schema_migrations")
    assert [tuple(row) for row in ledger] == [(1, "integration_config")]


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
        "dash-1", ORG, "stripe", json.dumps({"secretKey": "enc:v1:from-dashboard"}),
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
        ORG, "stripe",
    )
    assert raw["kind"] == "object"
    assert json.loads(raw["config"]) == config
    assert (raw["id"], raw["version"]) == (row.id, 1)
