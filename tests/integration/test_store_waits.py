"""Every wait on the store is bounded, and one tenant's stuck row starves no other tenant.

A row is locked from outside the service (PostgreSQL: `SELECT … FOR UPDATE` in an
open transaction; SQLite: another connection holding the write lock). Forty saves
to that row, sent without a client deadline, must each answer within
INTEGRATIONS_DB_TIMEOUT (plus slack), while decrypted reads of another
organization keep answering quickly, and the queued saves hold at most one
PostgreSQL connection between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from tests.conftest import CreateDatabase
from tests.harness import Running, new_org, rich_error, start_service, values_of

DB_TIMEOUT = 2.0
BOUND = DB_TIMEOUT + 1.0  # the configured timeout, plus slack for a loaded CI machine
OTHER_READ_BOUND = 1.5
SAVES = 40
SK = "sk_test_51HxWaitsLocked0000111"
SK_OTHER = "sk_test_51HxWaitsOther00002222"
SK_AFTER = "sk_test_51HxWaitsAfter00003333"
ENV = {"INTEGRATIONS_DB_TIMEOUT": str(DB_TIMEOUT), "INTEGRATIONS_DB_POOL_SIZE": "10"}


def save_request(org: str, value: str) -> pb.SaveIntegrationRequest:
    return pb.SaveIntegrationRequest(organization_id=org, provider="stripe", values={"secretKey": value})


async def timed(call: Awaitable[Any]) -> tuple[Any, float]:
    started = time.monotonic()
    try:
        result = await call
    except grpc.aio.AioRpcError as error:
        result = error
    return result, time.monotonic() - started


async def read_other(svc: Running, org: str) -> float:
    reply, elapsed = await timed(
        svc.stub.GetProviderConfig(
            pb.GetProviderConfigRequest(organization_id=org, provider="stripe", view=pb.CONFIG_VIEW_DECRYPTED),
            timeout=30,
        )
    )
    assert not isinstance(reply, grpc.aio.AioRpcError), f"read of another organization failed: {reply.code()}"
    assert values_of(reply.config)["secretKey"][0] == SK_OTHER
    return elapsed


async def saves_against_a_locked_row(
    svc: Running, locked_org: str, other_org: str, sample: Callable[[], Awaitable[int]] | None = None
) -> tuple[list[tuple[Any, float]], list[float], list[int]]:
    """40 saves of the locked row (no client deadline) and, meanwhile, reads of another organization."""
    saves = [
        asyncio.ensure_future(timed(svc.stub.SaveIntegration(save_request(locked_org, f"sk_test_51HxWaitsQ{i:04d}"))))
        for i in range(SAVES)
    ]
    reads: list[float] = []
    samples: list[int] = []
    await asyncio.sleep(0.2)  # the saves are queued
    while not all(future.done() for future in saves):
        reads.append(await read_other(svc, other_org))
        if sample is not None:
            samples.append(await sample())
        await asyncio.sleep(0.05)
    return [future.result() for future in saves], reads, samples


def assert_bounded_unavailable(results: list[tuple[Any, float]]) -> None:
    times = sorted(round(elapsed, 1) for _, elapsed in results)
    assert times[-1] < BOUND, f"the {SAVES} saves answered after {times} s (INTEGRATIONS_DB_TIMEOUT={DB_TIMEOUT})"
    for result, _ in results:
        assert isinstance(result, grpc.aio.AioRpcError), "a save of the locked row succeeded"
        error = rich_error(result)
        assert error.code is grpc.StatusCode.UNAVAILABLE, f"{error.code}: {error.message}"
        assert f"did not answer within {DB_TIMEOUT:g} s" in error.message, error.message
        assert error.request_id


# --- PostgreSQL -------------------------------------------------------------------------------------


@pytest.fixture
async def database_url(postgres_database_factory: CreateDatabase) -> str:
    return await postgres_database_factory()


@pytest.fixture
async def pg_service(database_url: str, tmp_path: Path) -> AsyncIterator[Running]:
    running = await start_service(database_url, tmp_path, ENV)
    yield running
    await running.close()


@contextlib.asynccontextmanager
async def row_locked_from_sql(database_url: str, org: str) -> AsyncIterator[None]:
    conn = await asyncpg.connect(database_url)
    transaction = conn.transaction()
    await transaction.start()
    try:
        locked = await conn.fetch(
            "SELECT id FROM integration_config WHERE organization_id = $1 AND provider = 'stripe' FOR UPDATE", org
        )
        assert len(locked) == 1
        yield
    finally:
        await transaction.rollback()
        await conn.close()


@pytest.mark.postgres
async def test_saves_queued_on_a_locked_row_answer_within_the_timeout_and_starve_no_one(
    pg_service: Running, database_url: str, postgres_server: str
) -> None:
    svc = pg_service
    locked_org, other_org = new_org(), new_org()
    await svc.stub.SaveIntegration(save_request(locked_org, SK))
    await svc.stub.SaveIntegration(save_request(other_org, SK_OTHER))
    monitor = await asyncpg.connect(postgres_server)
    database = urlsplit(database_url).path.lstrip("/")

    async def waiting_on_locks() -> int:
        # Backends of the service's database waiting for a lock (row or advisory), the locker aside.
        return int(
            await monitor.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'", database
            )
        )

    try:
        async with row_locked_from_sql(database_url, locked_org):
            results, reads, waiting = await saves_against_a_locked_row(svc, locked_org, other_org, waiting_on_locks)
    finally:
        await monitor.close()

    assert_bounded_unavailable(results)
    assert reads, "no read of the other organization ran while the saves waited"
    assert max(reads) < OTHER_READ_BOUND, f"reads of another organization took up to {max(reads):.2f} s"
    assert max(waiting) <= 1, f"{max(waiting)} connections waited on the locked row at once"
    # The lock is gone: the row takes a save again, on the same running service.
    saved = await svc.stub.SaveIntegration(save_request(locked_org, SK_AFTER))
    assert saved.config.etag
    reply = await svc.stub.GetProviderConfig(
        pb.GetProviderConfigRequest(organization_id=locked_org, provider="stripe", view=pb.CONFIG_VIEW_DECRYPTED)
    )
    assert values_of(reply.config)["secretKey"][0] == SK_AFTER


@pytest.mark.postgres
async def test_a_client_deadline_shorter_than_the_timeout_bounds_the_wait(
    pg_service: Running, database_url: str, postgres_server: str
) -> None:
    svc = pg_service
    org = new_org()
    await svc.stub.SaveIntegration(save_request(org, SK))
    monitor = await asyncpg.connect(postgres_server)
    try:
        async with row_locked_from_sql(database_url, org):
            result, elapsed = await timed(svc.stub.SaveIntegration(save_request(org, SK_AFTER), timeout=0.5))
            assert isinstance(result, grpc.aio.AioRpcError)
            assert result.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
            if result.code() is grpc.StatusCode.UNAVAILABLE:
                assert "before the call's deadline" in (result.details() or "")
            assert elapsed < 0.5 + 0.5
            await asyncio.sleep(0.5)
            # The service gave up too: nothing of it still waits on the row for INTEGRATIONS_DB_TIMEOUT.
            waiting = await monitor.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
                urlsplit(database_url).path.lstrip("/"),
            )
            assert waiting == 0
    finally:
        await monitor.close()


@pytest.mark.postgres
async def test_a_save_waiting_on_a_locked_table_gives_up_in_time_and_never_commits_later(
    pg_service: Running, database_url: str, postgres_server: str
) -> None:
    """The save of an existing row runs as one statement without BEGIN: its lock waits end by themselves.

    A client-side timeout alone would leave the statement queued on the server, to commit once the
    table is free, after its call answered UNAVAILABLE.
    """
    svc = pg_service
    org = new_org()
    await svc.stub.SaveIntegration(save_request(org, SK))
    locker = await asyncpg.connect(database_url)
    monitor = await asyncpg.connect(postgres_server)
    try:
        transaction = locker.transaction()
        await transaction.start()
        # Blocks every write of the table (a migration would), not reads.
        await locker.execute("LOCK TABLE integration_config IN EXCLUSIVE MODE")
        try:
            result, elapsed = await timed(svc.stub.SaveIntegration(save_request(org, SK_AFTER)))
            assert isinstance(result, grpc.aio.AioRpcError), "a save of the locked table succeeded"
            error = rich_error(result)
            assert error.code is grpc.StatusCode.UNAVAILABLE, f"{error.code}: {error.message}"
            assert f"did not answer within {DB_TIMEOUT:g} s" in error.message
            assert elapsed < BOUND
            # The server gave up too: nothing of the service's still waits for the table.
            waiting = await monitor.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
                urlsplit(database_url).path.lstrip("/"),
            )
            assert waiting == 0
        finally:
            await transaction.rollback()
        # With the table free again, the refused save did not land, and left no record of a change.
        reply = await svc.stub.GetProviderConfig(
            pb.GetProviderConfigRequest(organization_id=org, provider="stripe", view=pb.CONFIG_VIEW_DECRYPTED)
        )
        assert values_of(reply.config)["secretKey"][0] == SK
        saves = await locker.fetchval(
            "SELECT count(*) FROM audit_events WHERE organization_id = $1 AND rpc = 'SaveIntegration' "
            "AND outcome = 'OK'",
            org,
        )
        assert saves == 1
    finally:
        await locker.close()
        await monitor.close()


@pytest.mark.postgres
async def test_a_call_waiting_for_a_pool_connection_answers_within_the_timeout(
    database_url: str, tmp_path: Path
) -> None:
    """One pooled connection, taken by a save of a locked row: the wait for it counts against the budget."""
    svc = await start_service(database_url, tmp_path, {**ENV, "INTEGRATIONS_DB_POOL_SIZE": "1"})
    try:
        locked_org, other_org = new_org(), new_org()
        await svc.stub.SaveIntegration(save_request(locked_org, SK))
        await svc.stub.SaveIntegration(save_request(other_org, SK_OTHER))
        async with row_locked_from_sql(database_url, locked_org):
            saves = [
                asyncio.ensure_future(timed(svc.stub.SaveIntegration(save_request(locked_org, f"sk_test_51HxPool{i}"))))
                for i in range(5)
            ]
            await asyncio.sleep(0.2)
            read, elapsed = await timed(
                svc.stub.GetProviderConfig(
                    pb.GetProviderConfigRequest(organization_id=other_org, provider="stripe"), timeout=30
                )
            )
            results = await asyncio.gather(*saves)
        assert elapsed < BOUND, f"a read waited {elapsed:.2f} s for a pooled connection"
        if isinstance(read, grpc.aio.AioRpcError):
            assert read.code() is grpc.StatusCode.UNAVAILABLE
        assert max(seconds for _, seconds in results) < BOUND
    finally:
        await svc.close()


# --- SQLite -----------------------------------------------------------------------------------------


@pytest.fixture
async def sqlite_service(tmp_path: Path) -> AsyncIterator[tuple[Running, Path]]:
    path = tmp_path / "waits.sqlite3"
    running = await start_service(f"sqlite:///{path}", tmp_path, ENV)
    yield running, path
    await running.close()


@contextlib.contextmanager
def write_lock_held_elsewhere(path: Path) -> Any:
    """Another connection (as another process would) holds the database's write lock."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


async def test_sqlite_writers_blocked_by_another_connection_answer_within_the_timeout_and_readers_keep_going(
    sqlite_service: tuple[Running, Path],
) -> None:
    svc, path = sqlite_service
    locked_org, other_org = new_org(), new_org()
    await svc.stub.SaveIntegration(save_request(locked_org, SK))
    await svc.stub.SaveIntegration(save_request(other_org, SK_OTHER))

    with write_lock_held_elsewhere(path):
        results, reads, _ = await asyncio.wait_for(saves_against_a_locked_row(svc, locked_org, other_org), 120)

    assert_bounded_unavailable(results)
    assert reads, "no read of the other organization ran while the saves waited"
    assert max(reads) < OTHER_READ_BOUND, f"reads of another organization took up to {max(reads):.2f} s"
    await svc.stub.SaveIntegration(save_request(locked_org, SK_AFTER))
    reply = await svc.stub.GetProviderConfig(
        pb.GetProviderConfigRequest(organization_id=locked_org, provider="stripe", view=pb.CONFIG_VIEW_DECRYPTED)
    )
    assert values_of(reply.config)["secretKey"][0] == SK_AFTER
