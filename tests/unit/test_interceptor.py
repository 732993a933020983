"""The interceptor's per-call bookkeeping: request ids, and the wrapped handler of each method."""

from __future__ import annotations

import re
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from integrations.v1 import integrations_pb2 as pb
from integrations_service.api.auth import Authorizer
from integrations_service.api.interceptor import RpcInterceptor, request_ids
from integrations_service.domain.audit import AuditTrail
from integrations_service.metrics import Metrics
from integrations_service.store.memory import MemoryStore

GET = "/integrations.v1.IntegrationService/GetProviderConfig"


def test_request_ids_are_32_hex_characters_and_never_repeat() -> None:
    made = request_ids()
    ids = [made() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in ids)
    assert len(set(ids)) == len(ids)


def test_each_process_source_of_request_ids_has_its_own_random_prefix() -> None:
    first, second = request_ids(), request_ids()
    assert first()[:16] != second()[:16]  # 64 random bits each: equal once in 2**64


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def test_a_methods_wrapped_handler_is_built_once_and_unknown_methods_are_not_kept() -> None:
    inner = grpc.unary_unary_rpc_method_handler(
        lambda request, context: None,
        request_deserializer=pb.GetProviderConfigRequest.FromString,
        response_serializer=pb.GetProviderConfigResponse.SerializeToString,
    )
    looked_up: list[str] = []

    async def continuation(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        looked_up.append(details.method)
        return inner if details.method == GET else None

    interceptor = RpcInterceptor(Authorizer(None), AuditTrail(MemoryStore()), Metrics(CollectorRegistry()))
    first = await interceptor.intercept_service(continuation, _Details(GET))
    again = await interceptor.intercept_service(continuation, _Details(GET))
    assert first is not None
    assert again is first
    assert first is not inner  # the wrapper, not the servicer's own handler
    for _ in range(2):
        assert await interceptor.intercept_service(continuation, _Details("/x.Y/Unknown")) is None
    assert looked_up == [GET, "/x.Y/Unknown", "/x.Y/Unknown"]
