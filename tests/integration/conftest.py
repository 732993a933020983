"""The `store` fixture (every contract test runs once per backend) and the `svc` fixture (a service on each store)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from integrations_service.store import IntegrationStore
from integrations_service.store.memory import MemoryDatabase, MemoryStore
from integrations_service.store.postgres import PostgresStore
from integrations_service.store.sqlite import SqliteStore
from tests.harness import Running, start_service
from tests.integration.raw_rows import service_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(kind, where) of a database a service can run on: a fresh SQLite file, or this run's PostgreSQL database.

    Sync on purpose: it asks for the PostgreSQL fixture only for the postgres
    parameter (so SQLite tests run without a server), and getfixturevalue
    cannot be used from inside a running event loop.
    """
    return _location(request.param, request, tmp_path)


@pytest.fixture
def service_env() -> dict[str, str]:
    """Extra environment of the services below; a module overrides this fixture to give its own defaults."""
    return {}


@pytest.fixture
async def svc_any_store(
    store_location: tuple[str, str], tmp_path: Path, service_env: dict[str, str]
) -> AsyncIterator[Running]:
    """The real service, in-process, on each store: SQLite and this run's PostgreSQL database."""
    running = await start_service(service_url(*store_location), tmp_path, service_env)
    yield running
    await running.close()


@pytest.fixture
def svc(svc_any_store: Running) -> Running:
    """The service of a test that runs on each store (a module may override it with a one-store service)."""
    return svc_any_store


@pytest.fixture
def located(svc_any_store: Running, store_location: tuple[str, str]) -> tuple[Running, str, str]:
    """(service, kind, where): a running service and where its store keeps rows."""
    return svc_any_store, *store_location


@pytest.fixture
async def sqlite_svc(tmp_path: Path, service_env: dict[str, str]) -> AsyncIterator[Running]:
    """The real service, in-process, on an SQLite file only."""
    running = await start_service(f"sqlite:///{tmp_path / 'store.sqlite3'}", tmp_path, service_env)
    yield running
    await running.close()


# The in-memory store's "databases", by test: a second MemoryStore on one of them is another replica.
MEMORY_DATABASES: dict[str, MemoryDatabase] = {}


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def contract_location(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(kind, where) of every store the repository contract is proven on: the in-memory one too."""
    if request.param == "memory":
        MEMORY_DATABASES[request.node.nodeid] = MemoryDatabase()
        return "memory", request.node.nodeid
    return _location(request.param, request, tmp_path)


def _location(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if kind == "sqlite":
        return "sqlite", str(tmp_path / "store.sqlite3")
    return "postgres", str(request.getfixturevalue("postgres_database_url"))


@pytest.fixture
async def store(contract_location: tuple[str, str]) -> AsyncIterator[IntegrationStore]:
    """An open, migrated, empty store of each kind; closed after the test."""
    kind, where = contract_location
    opened: IntegrationStore
    if kind == "memory":
        opened = MemoryStore(MEMORY_DATABASES.pop(where))
    elif kind == "sqlite":
        opened = await SqliteStore.open(where)
    else:
        opened = await _empty_postgres_store(where)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def postgres_store(postgres_database_url: str) -> AsyncIterator[PostgresStore]:
    """A PostgreSQL store on this run's database, emptied first; for PostgreSQL-only tests."""
    opened = await _empty_postgres_store(postgres_database_url)
    try:
        yield opened
    finally:
        await opened.close()


async def _empty_postgres_store(url: str) -> PostgresStore:
    # The per-run database outlives each test; the table is emptied instead of recreated.
    opened = await PostgresStore.connect(url)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE integration_config, encryption_keys, audit_events")
    finally:
        await conn.close()
    return opened
