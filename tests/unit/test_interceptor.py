"""The interceptor's per-call bookkeeping: request ids, and the wrapped handler of each method, made at registration."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, cast

import grpc
import pytest
from prometheus_client import CollectorRegistry

from integrations.v1 import integrations_pb2 as pb
from integrations_service.api.auth import Authorizer
from integrations_service.api.interceptor import REQUEST_ID_KEY, RpcInterceptor, _request_id, request_ids
from integrations_service.api.server import WrappingRegistrar
from integrations_service.domain.audit import AuditTrail
from integrations_service.metrics import Metrics
from integrations_service.store.memory import MemoryStore

SERVICE = "integrations.v1.IntegrationService"
GET = f"/{SERVICE}/GetProviderConfig"


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


def _unary() -> grpc.RpcMethodHandler[Any, Any]:
    return grpc.unary_unary_rpc_method_handler(
        lambda request, context: None,
        request_deserializer=pb.GetProviderConfigRequest.FromString,
        response_serializer=pb.GetProviderConfigResponse.SerializeToString,
    )


class _RecordingServer:
    """What the registrar hands on: the two registration calls of a grpc.aio.Server."""

    def __init__(self) -> None:
        self.registered: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        self.generic: list[grpc.GenericRpcHandler] = []

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        self.registered.update({f"/{service}/{name}": handler for name, handler in handlers.items()})

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.generic.extend(handlers)


def _registrar() -> tuple[WrappingRegistrar, _RecordingServer]:
    server = _RecordingServer()
    interceptor = RpcInterceptor(Authorizer(None), AuditTrail(MemoryStore()), Metrics(CollectorRegistry()))
    return WrappingRegistrar(cast(grpc.aio.Server, server), interceptor), server


def test_handlers_registered_by_name_reach_the_server_wrapped_and_unchecked_streams_not_at_all() -> None:
    registrar, server = _registrar()
    inner = _unary()
    upload: grpc.RpcMethodHandler[Any, Any] = grpc.stream_unary_rpc_method_handler(lambda requests, context: None)
    registrar.add_registered_method_handlers(SERVICE, {"GetProviderConfig": inner, "Upload": upload})
    reflection_stream: grpc.RpcMethodHandler[Any, Any] = grpc.stream_stream_rpc_method_handler(
        lambda requests, context: None
    )
    registrar.add_registered_method_handlers("grpc.reflection.v1alpha.ServerReflection", {"Info": reflection_stream})
    assert set(server.registered) == {GET, "/grpc.reflection.v1alpha.ServerReflection/Info"}
    assert server.registered[GET] is not inner
    assert server.registered[GET].unary_unary is not inner.unary_unary  # the wrapper, not the servicer's own
    # A streaming method of the service would skip the checks: it is not served (UNIMPLEMENTED), fail closed.
    assert f"/{SERVICE}/Upload" not in server.registered
    # Reflection's stream carries no credential: served as it is, to every authenticated caller.
    assert server.registered["/grpc.reflection.v1alpha.ServerReflection/Info"] is reflection_stream


def test_a_generic_handlers_methods_are_wrapped_once_and_unknown_methods_are_not_kept() -> None:
    inner = _unary()
    asked: list[str] = []

    class Generic(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
            asked.append(details.method)
            return inner if details.method == GET else None

    registrar, server = _registrar()
    registrar.add_generic_rpc_handlers((Generic(),))
    (generic,) = server.generic
    first = generic.service(_Details(GET))
    assert first is not None
    assert first is not inner
    assert generic.service(_Details(GET)) is first
    for _ in range(2):
        assert generic.service(_Details("/x.Y/Unknown")) is None
    assert asked == [GET, "/x.Y/Unknown", "/x.Y/Unknown"]


class _Metadata:
    """A servicer context as far as the request id is concerned: the call's metadata."""

    def __init__(self, *metadata: tuple[str, str]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("3f2504e0-4f89-11d3-9a0c-0305e82c3301", True),  # a UUID
        ("trace.abc_1:2-3", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("", False),
        ("two words", False),
        ("forged\nline", False),
        ("émigré", False),
    ],
)
def test_a_callers_request_id_is_kept_only_in_the_form_docs_api_md_gives(sent: str, kept: bool) -> None:
    """docs/api.md, Errors: 1-64 characters of A-Z, a-z, 0-9, '.', '_', ':' and '-'; anything else is ignored."""
    found = _request_id(cast(Any, _Metadata(("other", "x"), (REQUEST_ID_KEY, sent))))
    assert found == (sent if kept else "")
