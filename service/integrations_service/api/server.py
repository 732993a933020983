"""Assembles the grpc.aio server: the service, health checking and reflection, plaintext or mutual TLS."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # grpc_health exports it as health.aio
from grpc_reflection.v1alpha import reflection

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc
from integrations_service.api import reflection as documented_reflection
from integrations_service.api.auth import Authorizer
from integrations_service.api.interceptor import RpcInterceptor
from integrations_service.api.servicer import IntegrationServicer
from integrations_service.domain.audit import AuditTrail
from integrations_service.domain.audit_pages import AuditPages
from integrations_service.domain.service import CredentialService
from integrations_service.domain.watch import ChangeWatches
from integrations_service.errors import ConfigurationError
from integrations_service.metrics import Metrics

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["IntegrationService"].full_name
# Clients may ping this often (seconds), even between calls; more often and the server ends the connection
# (GOAWAY "too_many_pings"). The clients' defaults (30 s) meet it.
MIN_CLIENT_PING_INTERVAL = 20


@dataclass(frozen=True)
class Keepalive:
    """HTTP/2 keepalive of the server: a ping after `time` seconds of quiet, the connection closed when no
    answer comes within `timeout`. That is how a watch stream whose consumer vanished (a killed pod, a
    partition) is noticed and its subscription freed."""

    time: float = 60.0
    timeout: float = 20.0

    def options(self) -> tuple[tuple[str, int], ...]:
        return (
            ("grpc.keepalive_time_ms", round(self.time * 1000)),
            ("grpc.keepalive_timeout_ms", round(self.timeout * 1000)),
            # gRPC core (1.5x+) times a ping's ack out with this one, not keepalive_timeout (a test catches it).
            ("grpc.http2.ping_timeout_ms", round(self.timeout * 1000)),
            # Keep pinging an idle watch stream (no data for hours is normal): the default stops after 2 pings.
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL * 1000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.max_receive_message_length", 1 << 20),
        )


# The options with the default settings (the clients' tests check their channel options against them).
_SERVER_OPTIONS = Keepalive().options()


def build_server(
    service: CredentialService,
    audit: AuditTrail,
    audit_pages: AuditPages,
    authorizer: Authorizer,
    metrics: Metrics,
    watches: ChangeWatches,
    *,
    reflection_enabled: bool,
    keepalive: Keepalive = Keepalive(),
) -> tuple[grpc.aio.Server, HealthServicer]:
    for method in _unary_methods():
        metrics.rpc(method)  # their series exist from the first scrape, at zero
    for method in _server_streaming_methods():
        metrics.stream_rpc(method)
    server = grpc.aio.server(options=keepalive.options())
    # The generated registration functions call only the two methods a WrappingRegistrar has.
    registrar = cast(grpc.aio.Server, WrappingRegistrar(server, RpcInterceptor(authorizer, audit, metrics)))
    pb_grpc.add_IntegrationServiceServicer_to_server(IntegrationServicer(service, audit_pages, watches), registrar)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registrar)
    if reflection_enabled:
        # grpcio-reflection speaks the v1alpha protocol: grpcurl 1.8 asks for it, newer ones fall back to it.
        names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        documented_reflection.enable(names, registrar)
    return server, health_servicer


class WrappingRegistrar:
    """Stands in for the server when servicers register: every handler reaches the server already wrapped.

    The generated `add_*Servicer_to_server` functions register each service twice: its handlers by name
    (which grpc looks up first) and a generic handler. Both get `RpcInterceptor.wrapped` handlers; a method
    the interceptor refuses is not registered at all, so it answers UNIMPLEMENTED.
    """

    def __init__(self, server: grpc.aio.Server, interceptor: RpcInterceptor) -> None:
        self._server = server
        self._interceptor = interceptor

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        wrapped = {
            name: handler
            for name, inner in method_handlers.items()
            if (handler := self._interceptor.wrapped(f"/{service_name}/{name}", inner)) is not None
        }
        self._server.add_registered_method_handlers(service_name, wrapped)

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_WrappedGenericHandler(handler, self._interceptor) for handler in generic_rpc_handlers)
        )


class _WrappedGenericHandler(grpc.GenericRpcHandler):
    """A generic handler whose handlers are wrapped, each once: grpc asks it only for methods not registered by
    name, and the methods of a servicer do not change while it serves."""

    def __init__(self, inner: grpc.GenericRpcHandler, interceptor: RpcInterceptor) -> None:
        self._inner = inner
        self._interceptor = interceptor
        self._wrapped: dict[str, grpc.RpcMethodHandler[Any, Any] | None] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None  # not one of this handler's methods: nothing kept, whatever a caller sends
        wrapped = self._wrapped[method] = self._interceptor.wrapped(method, handler)
        return wrapped


def _unary_methods() -> list[str]:
    services = (pb.DESCRIPTOR.services_by_name["IntegrationService"], health_pb2.DESCRIPTOR.services_by_name["Health"])
    return [
        f"/{service.full_name}/{method.name}"
        for service in services
        for method in service.methods
        if not method.client_streaming and not method.server_streaming
    ]


def _server_streaming_methods() -> list[str]:
    service = pb.DESCRIPTOR.services_by_name["IntegrationService"]
    return [
        f"/{service.full_name}/{method.name}"
        for method in service.methods
        if method.server_streaming and not method.client_streaming
    ]


def listen(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind the address; the port actually bound (useful with port 0)."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise ConfigurationError(f"INTEGRATIONS_LISTEN_ADDRESS: cannot listen on {address} (address in use?)")
    return port


async def mark_serving(health_servicer: HealthServicer) -> None:
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
