"""Assembles the grpc.aio server: the service, health checking and reflection."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # grpc_health exports it as health.aio
from grpc_reflection.v1alpha import reflection
from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc

from integrations_service.api.servicer import IntegrationServicer
from integrations_service.api.status import RpcInterceptor
from integrations_service.domain.service import CredentialService

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["IntegrationService"].full_name
# Keepalive the client's defaults can meet: pings every 30 s are welcome, even between calls.
_SERVER_OPTIONS = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 1 << 20),
)


def build_server(
    service: CredentialService, *, reflection_enabled: bool
) -> tuple[grpc.aio.Server, HealthServicer]:
    server = grpc.aio.server(interceptors=[RpcInterceptor()], options=_SERVER_OPTIONS)
    pb_grpc.add_IntegrationServiceServicer_to_server(IntegrationServicer(service), server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_enabled:
        # grpcio-reflection speaks the v1alpha protocol: grpcurl 1.8 asks for it, newer ones fall back to it.
        names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    return server, health_servicer


async def mark_serving(health_servicer: HealthServicer) -> None:
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
