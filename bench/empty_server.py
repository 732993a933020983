"""Baseline server for the benchmark: the service's gRPC setup, handlers that do nothing.

A grpc.aio server with the service's options, health checking, and generic
handlers for IntegrationService's GetProviderConfig and SaveIntegration that
parse the request and return an empty response. Whatever the real service
costs on top of this is the service's own work (interceptor, logging, domain,
crypto, store).

The fan-out baseline of bench/watch.py: WatchConfigChanges sends WatchStarted,
then whatever DeleteIntegration publishes, and nothing else. Each
DeleteIntegration builds one ConfigChange (its request's organization,
provider and etag, the time now) and queues that same message for every open
stream (an asyncio.Queue each): the least a server can do per stream for a
change, with no scope, no interceptor, no conversion per stream.

Usage: empty_server.py --listen-address 127.0.0.1:PORT (stops on SIGTERM/SIGINT).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from integrations.v1 import integrations_pb2 as pb
from integrations_service.api.server import SERVICE_NAME, Keepalive


async def get_provider_config(request: pb.GetProviderConfigRequest, context: Any) -> pb.GetProviderConfigResponse:
    return pb.GetProviderConfigResponse()


async def list_providers(request: pb.ListProvidersRequest, context: Any) -> pb.ListProvidersResponse:
    return pb.ListProvidersResponse()


# The queue of every open WatchConfigChanges stream.
_watchers: set[asyncio.Queue[pb.WatchConfigChangesResponse]] = set()


async def watch_config_changes(
    request: pb.WatchConfigChangesRequest, context: Any
) -> AsyncIterator[pb.WatchConfigChangesResponse]:
    queue: asyncio.Queue[pb.WatchConfigChangesResponse] = asyncio.Queue()
    _watchers.add(queue)
    try:
        started = pb.WatchConfigChangesResponse()
        started.started.start_time.GetCurrentTime()
        yield started
        while True:
            yield await queue.get()
    finally:
        _watchers.discard(queue)


async def delete_integration(request: pb.DeleteIntegrationRequest, context: Any) -> pb.DeleteIntegrationResponse:
    change = pb.ConfigChange(
        organization_id=request.organization_id,
        provider=request.provider,
        etag=request.etag,
        type=pb.CHANGE_TYPE_SAVED,
    )
    change.change_time.GetCurrentTime()
    message = pb.WatchConfigChangesResponse(change=change)
    for queue in _watchers:
        queue.put_nowait(message)
    return pb.DeleteIntegrationResponse()


async def save_integration(request: pb.SaveIntegrationRequest, context: Any) -> pb.SaveIntegrationResponse:
    return pb.SaveIntegrationResponse()


def server_options() -> tuple[tuple[str, int], ...]:
    """The real server's options with the default settings, so both servers differ only in what their handlers do."""
    return Keepalive().options()


def empty_handler() -> grpc.GenericRpcHandler:
    methods = {
        "GetProviderConfig": grpc.unary_unary_rpc_method_handler(
            get_provider_config,
            request_deserializer=pb.GetProviderConfigRequest.FromString,
            response_serializer=pb.GetProviderConfigResponse.SerializeToString,
        ),
        "SaveIntegration": grpc.unary_unary_rpc_method_handler(
            save_integration,
            request_deserializer=pb.SaveIntegrationRequest.FromString,
            response_serializer=pb.SaveIntegrationResponse.SerializeToString,
        ),
        "ListProviders": grpc.unary_unary_rpc_method_handler(
            list_providers,
            request_deserializer=pb.ListProvidersRequest.FromString,
            response_serializer=pb.ListProvidersResponse.SerializeToString,
        ),
        "DeleteIntegration": grpc.unary_unary_rpc_method_handler(
            delete_integration,
            request_deserializer=pb.DeleteIntegrationRequest.FromString,
            response_serializer=pb.DeleteIntegrationResponse.SerializeToString,
        ),
        "WatchConfigChanges": grpc.unary_stream_rpc_method_handler(
            watch_config_changes,
            request_deserializer=pb.WatchConfigChangesRequest.FromString,
            response_serializer=pb.WatchConfigChangesResponse.SerializeToString,
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)


async def serve(listen_address: str) -> None:
    server = grpc.aio.server(options=server_options())
    server.add_generic_rpc_handlers((empty_handler(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(listen_address) == 0:
        raise SystemExit(f"empty_server: cannot listen on {listen_address}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen-address", required=True, help="host:port, loopback only")
    asyncio.run(serve(parser.parse_args().listen_address))


if __name__ == "__main__":
    main()
