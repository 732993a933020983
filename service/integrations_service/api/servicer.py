"""The IntegrationService servicer: translate, call the domain, translate back.

Errors are not handled here: they propagate as `errors.ServiceError` and the
interceptor turns them into gRPC statuses. The caller (identity and request
id) comes from the interceptor, which authorized the call before it got here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from integrations.v1 import integrations_pb2 as pb
from integrations.v1 import integrations_pb2_grpc as pb_grpc
from integrations_service.api import convert
from integrations_service.api.interceptor import current_caller
from integrations_service.domain.audit_pages import AuditPages
from integrations_service.domain.service import CredentialService, DeleteRequest, ReadRequest, SaveRequest
from integrations_service.domain.watch import ChangeWatches, check_scope

Context = grpc.aio.ServicerContext[Any, Any]


class IntegrationServicer(pb_grpc.IntegrationServiceServicer):
    def __init__(self, service: CredentialService, audit_pages: AuditPages, watches: ChangeWatches) -> None:
        self._service = service
        self._audit_pages = audit_pages
        self._watches = watches
        self._watch_messages = convert.WatchMessages()

    async def ListProviders(self, request: pb.ListProvidersRequest, context: Context) -> pb.ListProvidersResponse:
        category = convert.category_from_pb(request.category)
        statuses = await self._service.list_providers(request.organization_id, category)
        response = pb.ListProvidersResponse()
        providers = response.providers
        for status in statuses:
            convert.provider_into(providers.add(), status)
        return response

    async def GetProviderConfig(
        self, request: pb.GetProviderConfigRequest, context: Context
    ) -> pb.GetProviderConfigResponse:
        read = ReadRequest(request.organization_id, request.provider, convert.view_from_pb(request.view))
        config = await self._service.get_config(read, current_caller())
        response = pb.GetProviderConfigResponse()
        convert.config_into(response.config, config)
        return response

    async def SaveIntegration(self, request: pb.SaveIntegrationRequest, context: Context) -> pb.SaveIntegrationResponse:
        save = SaveRequest(
            organization_id=request.organization_id,
            provider=request.provider,
            values=dict(request.values),
            clear_fields=tuple(request.clear_fields),
            etag=request.etag,
        )
        config = await self._service.save(save, current_caller())
        return pb.SaveIntegrationResponse(config=convert.config_to_pb(config))

    async def DeleteIntegration(
        self, request: pb.DeleteIntegrationRequest, context: Context
    ) -> pb.DeleteIntegrationResponse:
        delete = DeleteRequest(request.organization_id, request.provider, request.allow_missing, request.etag)
        await self._service.delete(delete, current_caller())
        return pb.DeleteIntegrationResponse()

    async def ListAuditEvents(self, request: pb.ListAuditEventsRequest, context: Context) -> pb.ListAuditEventsResponse:
        page = await self._audit_pages.page(request.organization_id, request.page_size, request.page_token)
        return pb.ListAuditEventsResponse(
            events=[convert.audit_to_pb(entry) for entry in page.entries], next_page_token=page.next_page_token
        )

    async def WatchConfigChanges(
        self, request: pb.WatchConfigChangesRequest, context: Context
    ) -> AsyncIterator[pb.WatchConfigChangesResponse]:
        scope = check_scope(request.organization_id, request.providers)
        async for event in self._watches.watch(scope):
            yield self._watch_messages.of(event)
