"""Shared test helpers: a real service on a real socket, and rich-status decoding."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc
from integrations_service import app
from integrations_service.config import load_settings

# Fixed test keys (never used outside tests).
TEST_KEY = "Zm9yLXRlc3RzLW9ubHktMzItYnl0ZXMtb2Yta2V5ISE="
OTHER_KEY = "b3RoZXItdGVzdC1rZXktb2YtMzItYnl0ZXMtLS0tLSE="


@dataclass
class Running:
    stub: pb_grpc.IntegrationServiceStub
    channel: grpc.aio.Channel
    service: app.RunningService
    database_url: str
    target: str

    async def close(self) -> None:
        await self.channel.close()
        await self.service.stop(0)


async def start_service(database_url: str, data_dir: Path, extra_env: Mapping[str, str] = ()) -> Running:  # type: ignore[assignment]
    environ = {
        "INTEGRATIONS_LISTEN_ADDRESS": "127.0.0.1:0",
        "INTEGRATIONS_METRICS_ADDRESS": "127.0.0.1:0",
        "INTEGRATION_ENCRYPTION_KEY": TEST_KEY,
        "DATABASE_URL": database_url,
        "INTEGRATIONS_DATA_DIR": str(data_dir),
        **dict(extra_env),
    }
    running = await app.start(load_settings(None, environ))
    target = f"127.0.0.1:{running.port}"
    channel = grpc.aio.insecure_channel(target)
    return Running(pb_grpc.IntegrationServiceStub(channel), channel, running, database_url, target)


def new_org() -> str:
    return f"org_{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class RichError:
    code: grpc.StatusCode
    message: str
    violations: dict[str, str]
    request_id: str
    resource: tuple[str, str] = ("", "")


def rich_error(error: grpc.aio.AioRpcError) -> RichError:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    violations: dict[str, str] = {}
    request_id = ""
    resource = ("", "")
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.update({v.field: v.description for v in bad.field_violations})
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            info_resource = error_details_pb2.ResourceInfo()
            detail.Unpack(info_resource)
            resource = (info_resource.resource_type, info_resource.resource_name)
        elif detail.Is(error_details_pb2.RequestInfo.DESCRIPTOR):
            info = error_details_pb2.RequestInfo()
            detail.Unpack(info)
            request_id = info.request_id
    return RichError(error.code(), error.details() or "", violations, request_id, resource)


def values_of(config: pb.ProviderConfig) -> dict[str, tuple[str, int]]:
    return {key: (v.value, v.source) for key, v in config.values.items()}


Metadata = tuple[tuple[str, str], ...]


async def save(
    svc: Running,
    org: str,
    provider: str = "stripe",
    etag: str = "",
    clear: tuple[str, ...] = (),
    metadata: Metadata | None = None,
    **values: str,
) -> pb.ProviderConfig:
    """SaveIntegration of `values` (field key -> value) over the service's socket; the saved config."""
    request = pb.SaveIntegrationRequest(
        organization_id=org, provider=provider, values=values, clear_fields=list(clear), etag=etag
    )
    reply = await svc.stub.SaveIntegration(request, metadata=metadata)
    return reply.config


async def get(
    svc: Running,
    org: str,
    provider: str = "stripe",
    view: int = pb.CONFIG_VIEW_UNSPECIFIED,
    metadata: Metadata | None = None,
) -> pb.ProviderConfig:
    """GetProviderConfig in the given view over the service's socket."""
    request = pb.GetProviderConfigRequest(organization_id=org, provider=provider, view=view)  # type: ignore[arg-type]
    reply = await svc.stub.GetProviderConfig(request, metadata=metadata)
    return reply.config


async def refused(call: object) -> grpc.aio.AioRpcError:
    """The error a call that must fail ends with (the test fails if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value
