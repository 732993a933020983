"""The IntegrationService servicer: translate, call the domain, translate back.

Errors are not handled here: they propagate as `errors.ServiceError` and the
interceptor in `api.status` turns them into gRPC statuses.
"""

from __future__ import annotations

import grpc
from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc

from integrations_service.api import convert
from integrations_service.domain.resolution import ConfigView
from integrations_service.domain.service import CredentialService


class IntegrationServicer(pb_grpc.IntegrationServiceServicer):
    def __init__(self, service: CredentialService) -> None:
        self._service = service

    async def ListProviders(
        self, request: pb.ListProvidersRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ListProvidersResponse:
        statuses = await self._service.list_providers(
            request.organization_id, convert.category_from_pb(request.category)
        )
        return pb.ListProvidersResponse(providers=[convert.provider_to_pb(s) for s in statuses])

    async def GetProviderConfig(
        self, request: pb.GetProviderConfigRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetProviderConfigResponse:
        view: ConfigView = convert.view_from_pb(request.view)
        config = await self._service.get_config(request.organization_id, request.provider, view)
        return pb.GetProviderConfigResponse(config=convert.config_to_pb(config))

    async def SaveIntegration(
        self, request: pb.SaveIntegrationRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.SaveIntegrationResponse:
        config = await self._service.save(
            request.organization_id,
            request.provider,
            dict(request.values),
            list(request.clear_fields),
            request.etag,
        )
        return pb.SaveIntegrationResponse(config=convert.config_to_pb(config))

    async def DeleteIntegration(
        self, request: pb.DeleteIntegrationRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.DeleteIntegrationResponse:
        await self._service.delete(request.organization_id, request.provider, request.allow_missing, request.etag)
        return pb.DeleteIntegrationResponse()
