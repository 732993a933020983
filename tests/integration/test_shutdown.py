"""SIGTERM to a real server process in the middle of a request: the request finishes, nothing new starts."""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc
from integrations_service.store.postgres import ROW_LOCK_NAMESPACE
from tests.conftest import CreateDatabase
from tests.harness import TEST_KEY
from tests.processes import Processes, clean_env, health_status

pytestmark = pytest.mark.postgres


async def wait_until_blocked(admin: asyncpg.Connection, database: str, at_least: int = 1) -> None:
    """Until `at_least` service connections wait on the advisory lock this test holds.

    Ask on a connection outside the transaction holding the locks: within a transaction, pg_stat_activity
    is a snapshot, and connections opened after it are not in it.
    """
    for _ in range(200):
        waiting = await admin.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE NOT l.granted AND l.locktype = 'advisory' AND a.datname = $1",
            database,
        )
        if waiting >= at_least:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the save never reached the row lock")


async def test_sigterm_lets_the_in_flight_save_finish_and_refuses_new_calls(
    postgres_database_url: str, tmp_path: Path
) -> None:
    env = clean_env(
        {
            "DATABASE_URL": postgres_database_url,
            "INTEGRATION_ENCRYPTION_KEY": TEST_KEY,
            "INTEGRATIONS_SHUTDOWN_GRACE": "10",
            "INTEGRATIONS_METRICS_ADDRESS": "",
        }
    )
    org = f"org_shutdown_{int(time.time() * 1000)}"
    with Processes(tmp_path) as processes:
        server = processes.serve(tmp_path / "work", env)
        admin = await asyncpg.connect(postgres_database_url)
        channel = grpc.aio.insecure_channel(server.target)
        stub = pb_grpc.IntegrationServiceStub(channel)
        try:
            # Hold the row lock the service's upsert takes, so the save stays in flight.
            lock = admin.transaction()
            await lock.start()
            await admin.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", ROW_LOCK_NAMESPACE, f"{org}/stripe")
            request = pb.SaveIntegrationRequest(
                organization_id=org, provider="stripe", values={"secretKey": "sk_test_in_flight_0001"}
            )
            in_flight = asyncio.ensure_future(stub.SaveIntegration(request, timeout=20))
            await wait_until_blocked(admin, postgres_database_url.rsplit("/", 1)[1])

            server.popen.terminate()  # SIGTERM
            await asyncio.sleep(0.5)
            assert server.running(), "the server must wait for the in-flight call"
            assert health_status(server.target) != "SERVING"
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListProviders(pb.ListProvidersRequest(), timeout=5)
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE

            await lock.commit()  # the save can go on now
            reply = await in_flight
            assert reply.config.values["secretKey"].value == "••••••••0001"
            exit_code = await asyncio.get_running_loop().run_in_executor(None, server.popen.wait, 15)
        finally:
            await channel.close()
            await admin.close()
    assert exit_code == 0
    log = server.stderr()
    assert "shutting down" in log
    assert "stopped" in log
    assert "sk_test_in_flight_0001" not in log


async def test_sigterm_with_hostile_records_in_the_audit_buffer_exits_0_and_saves_the_key_counts(
    postgres_database_factory: CreateDatabase, tmp_path: Path
) -> None:
    """Refused requests from a caller with no role used to poison the final flush: exit 1, counts lost."""
    database_url = await postgres_database_factory()  # its own: the key counts are this process's alone
    env = clean_env({"DATABASE_URL": database_url, "INTEGRATION_ENCRYPTION_KEY": TEST_KEY})
    org = f"org_poison_{int(time.time() * 1000)}"
    saves = 3
    with Processes(tmp_path) as processes:
        server = processes.serve(tmp_path / "work", env)
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = pb_grpc.IntegrationServiceStub(channel)
            for organization_id, provider in (("o" + secrets.token_urlsafe(9000), "stripe"), (org, "stri\x00pe")):
                for call in (
                    stub.GetProviderConfig(
                        pb.GetProviderConfigRequest(
                            organization_id=organization_id, provider=provider, view=pb.CONFIG_VIEW_DECRYPTED
                        )
                    ),
                    stub.SaveIntegration(
                        pb.SaveIntegrationRequest(
                            organization_id=organization_id, provider=provider, values={"secretKey": "sk_test_x"}
                        )
                    ),
                ):
                    with pytest.raises(grpc.aio.AioRpcError):
                        await call
            for i in range(saves):
                await stub.SaveIntegration(
                    pb.SaveIntegrationRequest(
                        organization_id=org, provider="stripe", values={"secretKey": f"sk_test_poison_{i:04d}"}
                    )
                )
            await stub.GetProviderConfig(
                pb.GetProviderConfigRequest(organization_id=org, provider="stripe", view=pb.CONFIG_VIEW_DECRYPTED)
            )
        # Well within the key counts' 10 s flush interval: only the shutdown can save them.
        exit_code = server.terminate()
    assert exit_code == 0, server.stderr()
    conn = await asyncpg.connect(database_url)
    try:
        encryptions = await conn.fetchval("SELECT encryptions FROM encryption_keys WHERE key_id = 'default'")
        outcomes = [
            tuple(r)
            for r in await conn.fetch(
                "SELECT rpc, outcome FROM audit_events WHERE organization_id = $1 ORDER BY id", org
            )
        ]
        longest = await conn.fetchval("SELECT max(length(organization_id)) FROM audit_events")
    finally:
        await conn.close()
    assert encryptions == saves
    assert ("GetProviderConfig", "OK") in outcomes  # the decrypted read after the hostile ones was stored
    # A provider id with a NUL is not one the catalog could hold: refused as INVALID_ARGUMENT, and audited.
    assert ("SaveIntegration", "InvalidArgument") in outcomes
    assert longest < 200
    assert "stopped" in server.stderr()
