"""What is particular to each backend: failure and recovery, files, and picking one from DATABASE_URL."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from integrations_service import errors
from integrations_service.store import IntegrationStore, StoredIntegration
from integrations_service.store.factory import open_store
from integrations_service.store.postgres import PostgresStore
from integrations_service.store.sqlite import SqliteStore

ORG = "org_1"
PASSWORD = "hunter2-not-a-real-password"


def put(values: dict[str, str]) -> Callable[[StoredIntegration | None], dict[str, str]]:
    def merge(current: StoredIntegration | None) -> dict[str, str]:
        return {**(current.config if current else {}), **values}

    return merge


async def terminate_connections(admin_url: str, database_url: str) -> int:
    """What a PostgreSQL restart or failover does to the store's pooled connections."""
    database = database_url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(admin_url)
    try:
        killed = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
    finally:
        await conn.close()
    return len(killed)


# --- PostgreSQL: outages and recovery ----------------------------------------------------------

OPERATIONS: dict[str, Callable[[IntegrationStore], Awaitable[object]]] = {
    "get": lambda store: store.get(ORG, "stripe"),
    "list": lambda store: store.list_for_organization(ORG),
    "upsert": lambda store: store.upsert(ORG, "stripe", put({"k": "v"})),
    "delete": lambda store: store.delete(ORG, "easypay", lambda current: None),
}


@pytest.mark.postgres
@pytest.mark.parametrize("operation", list(OPERATIONS))
async def test_the_store_recovers_when_postgres_drops_its_connections(
    postgres_store: PostgresStore, postgres_server: str, postgres_database_url: str, operation: str
) -> None:
    run = OPERATIONS[operation]
    await postgres_store.upsert(ORG, "stripe", put({"before": "x"}))
    # Several pooled connections, so some are idle (and dead) when the next call comes.
    await asyncio.gather(*(postgres_store.get(ORG, "stripe") for _ in range(5)))
    assert await terminate_connections(postgres_server, postgres_database_url) >= 1

    [first] = await asyncio.gather(run(postgres_store), return_exceptions=True)
    if isinstance(first, BaseException):  # allowed to fail, but only as Unavailable
        assert isinstance(first, errors.Unavailable), repr(first)
        assert first.message == "the credential store (PostgreSQL) is unreachable"
    await run(postgres_store)  # no new store: the pool replaced the dead connections
    row = await postgres_store.get(ORG, "stripe")
    assert row is not None
    assert row.config["before"] == "x"


@pytest.mark.postgres
async def test_many_calls_right_after_the_connections_drop_all_settle(
    postgres_store: PostgresStore, postgres_server: str, postgres_database_url: str
) -> None:
    await postgres_store.upsert(ORG, "stripe", put({"k": "v"}))
    await asyncio.gather(*(postgres_store.get(ORG, "stripe") for _ in range(10)))
    await terminate_connections(postgres_server, postgres_database_url)

    outcomes = await asyncio.gather(*(postgres_store.get(ORG, "stripe") for _ in range(20)), return_exceptions=True)
    assert all(isinstance(o, StoredIntegration | errors.Unavailable) for o in outcomes), outcomes
    assert await postgres_store.get(ORG, "stripe") is not None


async def test_connecting_to_an_unreachable_server_is_unavailable() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(errors.Unavailable) as raised:
        await PostgresStore.connect(f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/postgres", connect_timeout=0.5)
    assert loop.time() - started < 5
    assert raised.value.message == "the credential store (PostgreSQL) is unreachable"
    assert PASSWORD not in str(raised.value)


@pytest.mark.postgres
async def test_a_missing_database_is_a_configuration_error(postgres_server: str) -> None:
    url = postgres_server.rsplit("/", 1)[0] + "/integrations_test_does_not_exist"
    with pytest.raises(errors.ConfigurationError, match="DATABASE_URL"):
        await PostgresStore.connect(url, connect_timeout=2)


async def test_a_malformed_postgres_url_is_a_configuration_error_without_the_password() -> None:
    with pytest.raises(errors.ConfigurationError, match="DATABASE_URL") as raised:
        await PostgresStore.connect(f"postgresql://postgres:{PASSWORD}@127.0.0.1:notaport/db", connect_timeout=1)
    assert PASSWORD not in str(raised.value)
    assert raised.value.__cause__ is None
    assert raised.value.__suppress_context__


@pytest.mark.postgres
async def test_close_is_bounded_and_idempotent(postgres_database_url: str) -> None:
    store = await PostgresStore.connect(postgres_database_url)
    await store.close()
    await store.close()
    with pytest.raises(errors.Unavailable):
        await store.get(ORG, "stripe")


# --- SQLite -------------------------------------------------------------------------------------


async def test_the_sqlite_file_and_its_folder_are_created_private(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "integrations.sqlite3"
    store = await SqliteStore.open(path)
    try:
        await store.upsert(ORG, "stripe", put({"k": "v"}))
        assert path.exists()
        for file in path.parent.iterdir():  # the database and its -wal / -shm companions
            assert stat.S_IMODE(file.stat().st_mode) & 0o077 == 0, file
    finally:
        await store.close()


async def test_an_unopenable_sqlite_path_is_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(errors.Unavailable, match="SQLite"):
        await SqliteStore.open(blocker / "integrations.sqlite3")


async def test_sqlite_rows_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "integrations.sqlite3"
    store = await SqliteStore.open(path)
    written = await store.upsert(ORG, "stripe", put({"k": "v"}))
    await store.close()
    await store.close()
    reopened = await SqliteStore.open(path)
    try:
        assert await reopened.get(ORG, "stripe") == written
    finally:
        await reopened.close()


# --- open_store ---------------------------------------------------------------------------------


async def test_no_database_url_opens_the_embedded_store_in_the_data_folder(tmp_path: Path) -> None:
    for url in (None, ""):
        store = await open_store(url, tmp_path / "data")
        try:
            assert isinstance(store, SqliteStore)
            assert (tmp_path / "data" / "integrations.sqlite3").exists()
        finally:
            await store.close()


async def test_sqlite_urls_take_the_path_after_the_third_slash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    relative = await open_store("sqlite:///relative/x.sqlite3", tmp_path / "unused")
    absolute = await open_store(f"sqlite:///{tmp_path}/absolute/y.sqlite3", tmp_path / "unused")
    await relative.close()
    await absolute.close()
    assert (tmp_path / "relative" / "x.sqlite3").exists()
    assert (tmp_path / "absolute" / "y.sqlite3").exists()
    assert not (tmp_path / "unused").exists()


@pytest.mark.parametrize(
    "url",
    [
        f"mysql://root:{PASSWORD}@db/credentials",
        f"root:{PASSWORD}@db/credentials",
        "sqlite://relative.db",
        "sqlite:///",
        "sqlite:///x.db?mode=ro",
    ],
)
async def test_unusable_database_urls_are_configuration_errors(url: str, tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigurationError, match="DATABASE_URL") as raised:
        await open_store(url, tmp_path)
    assert PASSWORD not in str(raised.value)


@pytest.mark.postgres
@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
async def test_postgres_urls_open_the_postgres_store(postgres_database_url: str, scheme: str) -> None:
    url = scheme + postgres_database_url[postgres_database_url.index("://") :]
    store = await open_store(url, Path("unused"), timeout=3, pool_size=2)
    try:
        assert isinstance(store, PostgresStore)
        assert await store.get("org_only_here", "stripe") is None
    finally:
        await store.close()
