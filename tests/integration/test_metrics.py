"""The Prometheus endpoint of a real service: what it counts, and that its labels stay bounded and secret-free."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from integrations.v1 import integrations_pb2 as pb
from tests.harness import Running, new_org, start_service
from tests.integration.raw_rows import overwrite_config, stored_config, tampered

SECRET = "sk_test_metrics_secret_0000000001"


@pytest.fixture
async def svc(store_location: tuple[str, str], tmp_path: Path) -> AsyncIterator[Running]:
    kind, where = store_location
    running = await start_service(f"sqlite:///{where}" if kind == "sqlite" else where, tmp_path)
    yield running
    await running.close()


async def scrape(running: Running) -> str:
    url = f"http://127.0.0.1:{running.service.metrics_port}/metrics"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return str(reply.read().decode())

    return await asyncio.get_running_loop().run_in_executor(None, fetch)


def sample(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    raise AssertionError(f"no sample {name}{{{wanted}}}")


async def test_rpcs_store_calls_and_key_use_are_counted(svc: Running) -> None:
    org = new_org()
    await svc.stub.SaveIntegration(
        pb.SaveIntegrationRequest(organization_id=org, provider="stripe", values={"secretKey": SECRET})
    )
    for _ in range(3):
        await svc.stub.GetProviderConfig(
            pb.GetProviderConfigRequest(organization_id=org, provider="stripe", view=pb.CONFIG_VIEW_DECRYPTED)
        )
    with pytest.raises(grpc.aio.AioRpcError):
        await svc.stub.GetProviderConfig(pb.GetProviderConfigRequest(organization_id=org, provider="paypal"))

    text = await scrape(svc)
    get = "/integrations.v1.IntegrationService/GetProviderConfig"
    assert sample(text, "integrations_rpc_requests_total", method=get, code="OK") == 3
    assert sample(text, "integrations_rpc_requests_total", method=get, code="NOT_FOUND") == 1
    assert sample(text, "integrations_rpc_duration_seconds_count", method=get) == 4
    # The row cache answers the later reads. On PostgreSQL the save's own notification may come after the first
    # read cached the row, and evict it (the cache drops a row on every notification of it, a rewrap's too: it
    # holds ciphertext, which a rewrap changes under the same version).
    store_reads = sample(text, "integrations_store_operation_duration_seconds_count", operation="get")
    assert store_reads in (1, 2)
    assert sample(text, "integrations_cache_requests_total", result="miss") == store_reads
    assert sample(text, "integrations_cache_requests_total", result="hit") == 3 - store_reads
    assert sample(text, "integrations_store_operation_duration_seconds_count", operation="upsert") == 1
    assert sample(text, "integrations_key_encryptions", key_id="default") >= 1
    assert org not in text, "an organization id is an unbounded label"
    assert SECRET not in text


async def test_decryption_failures_are_counted_by_provider(svc: Running, store_location: tuple[str, str]) -> None:
    org = new_org()
    await svc.stub.SaveIntegration(
        pb.SaveIntegrationRequest(organization_id=org, provider="easypay", values={"apiKey": "easypay-api-key-0001"})
    )
    kind, where = store_location
    stored = await stored_config(kind, where, org, "easypay")
    await overwrite_config(kind, where, org, "easypay", {**stored, "apiKey": tampered(stored["apiKey"])})
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await svc.stub.GetProviderConfig(pb.GetProviderConfigRequest(organization_id=org, provider="easypay"))
    assert failed.value.code() is grpc.StatusCode.DATA_LOSS
    text = await scrape(svc)
    assert sample(text, "integrations_decryption_failures_total", provider="easypay") == 1


@pytest.mark.postgres
async def test_pool_use_is_reported_for_postgresql(postgres_database_url: str, tmp_path: Path) -> None:
    running = await start_service(postgres_database_url, tmp_path)
    try:
        text = await scrape(running)
        assert sample(text, "integrations_store_pool_connections", state="max") == 10
        assert sample(text, "integrations_store_pool_connections", state="idle") >= 0
    finally:
        await running.close()


async def test_grpc_server_metrics_use_the_names_stock_dashboards_query(svc: Running) -> None:
    org = new_org()
    await svc.stub.SaveIntegration(
        pb.SaveIntegrationRequest(organization_id=org, provider="stripe", values={"secretKey": SECRET})
    )
    for _ in range(2):
        await svc.stub.GetProviderConfig(pb.GetProviderConfigRequest(organization_id=org, provider="stripe"))
    with pytest.raises(grpc.aio.AioRpcError):
        await svc.stub.GetProviderConfig(pb.GetProviderConfigRequest(organization_id=org, provider="paypal"))

    text = await scrape(svc)
    get = {
        "grpc_type": "unary",
        "grpc_service": "integrations.v1.IntegrationService",
        "grpc_method": "GetProviderConfig",
    }
    assert sample(text, "grpc_server_started_total", **get) == 3
    assert sample(text, "grpc_server_handled_total", **get, grpc_code="OK") == 2
    assert sample(text, "grpc_server_handled_total", **get, grpc_code="NOT_FOUND") == 1
    assert sample(text, "grpc_server_handling_seconds_count", **get) == 3
    assert sample(text, "grpc_server_handling_seconds_bucket", **get, le="+Inf") == 3
    assert sample(text, "grpc_server_msg_received_total", **get) == 3
    assert sample(text, "grpc_server_msg_sent_total", **get) == 2
    # Methods not called yet are there at zero, every code included, as go-grpc-prometheus initialises them.
    delete = {**get, "grpc_method": "DeleteIntegration"}
    assert sample(text, "grpc_server_handled_total", **delete, grpc_code="UNAVAILABLE") == 0
    assert (
        sample(
            text,
            "grpc_server_started_total",
            grpc_type="unary",
            grpc_service="grpc.health.v1.Health",
            grpc_method="Check",
        )
        >= 0
    )


async def test_process_metrics_are_exported_and_no_created_series(svc: Running) -> None:
    text = await scrape(svc)
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert {
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "python_info",
        "python_gc_collections_total",
    } <= names
    assert (
        float(next(line.split()[1] for line in text.splitlines() if line.startswith("process_resident_memory_bytes ")))
        > 0
    )
    assert not [line for line in text.splitlines() if "_created" in line], "no _created series"
