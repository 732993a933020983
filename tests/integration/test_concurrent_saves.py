"""Saves of one row from two server processes at once lose nothing.

Two `integrations-service serve` processes, "A" and "B", on one PostgreSQL database, as two
replicas. Each saves two of the four fields of one ifthenpay row, over and over, all at the same
time: every save of an existing row is the optimistic one-statement write, and the other process's
saves keep changing the row under it, so saves keep finding the row changed and merging again.
Whatever interleaving happened, the row must end up with every field's last value, one version per
save, and one audit record per save.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc
from tests.conftest import CreateDatabase
from tests.harness import TEST_KEY, new_org, values_of
from tests.processes import Processes, clean_env

ROUNDS = 25
# Field -> the replica that saves it ("A" or "B"), and its value's prefix.
FIELDS = {
    "antiPhishingKey": ("A", "anti-phishing"),
    "mbKey": ("A", "MB"),
    "mbwayKey": ("B", "MBWAY"),
    "ccKey": ("B", "CC"),
}

pytestmark = pytest.mark.postgres


@dataclass
class Replicas:
    database: str
    stubs: dict[str, pb_grpc.IntegrationServiceStub] = field(default_factory=dict)


@pytest.fixture
async def replicas(postgres_database_factory: CreateDatabase, tmp_path: Path) -> AsyncIterator[Replicas]:
    running = Replicas(await postgres_database_factory())
    channels: list[grpc.aio.Channel] = []
    with Processes(tmp_path) as processes:
        for name in ("A", "B"):
            environment = clean_env(
                {
                    "INTEGRATION_ENCRYPTION_KEY": TEST_KEY,
                    "INTEGRATIONS_DATA_DIR": str(tmp_path / name),
                    "DATABASE_URL": running.database,
                }
            )
            process = await asyncio.to_thread(processes.serve, tmp_path / name, environment)
            channel = grpc.aio.insecure_channel(process.target)
            channels.append(channel)
            running.stubs[name] = pb_grpc.IntegrationServiceStub(channel)
        yield running
        for channel in channels:
            await channel.close()


async def save(stub: pb_grpc.IntegrationServiceStub, org: str, **values: str) -> pb.ProviderConfig:
    reply = await stub.SaveIntegration(
        pb.SaveIntegrationRequest(organization_id=org, provider="ifthenpay", values=values), timeout=30
    )
    return reply.config


async def test_two_processes_saving_different_fields_of_one_row_at_once_lose_no_update(
    replicas: Replicas,
) -> None:
    org = new_org()
    stubs = replicas.stubs
    stub_a, stub_b = stubs["A"], stubs["B"]
    # The row exists (the first save of a row is the locked insert); both processes have saved it once.
    await save(stub_a, org, antiPhishingKey="anti-phishing-seed")
    await save(stub_b, org, ccKey="CC-seed")

    etags: list[str] = []

    async def keep_saving(field: str) -> None:
        replica, prefix = FIELDS[field]
        for round_ in range(ROUNDS):  # one field's saves in order, all four fields' at once
            config = await save(stubs[replica], org, **{field: f"{prefix}-{round_:04d}"})
            etags.append(config.etag)

    await asyncio.gather(*(keep_saving(field) for field in FIELDS))

    final = values_of(
        (
            await stub_a.GetProviderConfig(
                pb.GetProviderConfigRequest(organization_id=org, provider="ifthenpay", view=pb.CONFIG_VIEW_DECRYPTED),
                timeout=30,
            )
        ).config
    )
    assert {field: final[field][0] for field in FIELDS} == {
        field: f"{prefix}-{ROUNDS - 1:04d}" for field, (_, prefix) in FIELDS.items()
    }
    saves = 2 + len(FIELDS) * ROUNDS
    assert len(set(etags)) == len(etags), "two saves answered the same version"
    conn = await asyncpg.connect(replicas.database)
    try:
        version = await conn.fetchval(
            "SELECT version FROM integration_config WHERE organization_id = $1 AND provider = 'ifthenpay'", org
        )
        audited = await conn.fetchval(
            "SELECT count(*) FROM audit_events WHERE organization_id = $1 AND rpc = 'SaveIntegration' "
            "AND outcome = 'OK'",
            org,
        )
    finally:
        await conn.close()
    assert version == saves, "a save was lost, or written twice"
    assert audited == saves
