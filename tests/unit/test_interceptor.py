"""The interceptor's per-call bookkeeping: request ids, and the wrapped handler of each method, made at registration."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, cast

import grpc
import pytest
from prometheus_client import CollectorRegistry

from integrations.v1 import integrations_pb2 as pb
from integrations_service import errors
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


class _Aborting(_Metadata):
    """A servicer context that sends nothing: `abort` notes what the call had logged and counted by the time its
    status would leave, and raises as grpc.aio's does."""

    def __init__(self, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture) -> None:
        super().__init__((REQUEST_ID_KEY, "abort-order"))
        self._registry = registry
        self._caplog = caplog
        self.at_abort: tuple[list[str], float | None] | None = None
        self.code: grpc.StatusCode | None = None

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}

    def time_remaining(self) -> float | None:
        return None

    def cancelled(self) -> bool:
        return False

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str]]) -> None:
        pass

    async def abort(self, code: grpc.StatusCode, details: str, trailing: Sequence[tuple[str, str]]) -> None:
        lines = [record.getMessage() for record in self._caplog.records]
        labels = {"grpc_type": "unary", "grpc_service": SERVICE, "grpc_method": "GetProviderConfig"}
        if code is grpc.StatusCode.NOT_FOUND:  # the unary call's count; streams are checked by their line alone
            handled = self._registry.get_sample_value("grpc_server_handled_total", {**labels, "grpc_code": code.name})
        else:
            handled = None
        self.code = code
        self.at_abort = (lines, handled)
        raise grpc.aio.AbortError()


async def test_a_failed_call_is_logged_and_counted_before_its_status_is_sent(caplog: pytest.LogCaptureFixture) -> None:
    """A caller that holds the error may look for the call at once: its line and count exist by then (CI once saw a
    NOT_FOUND's line missing right after the caller got it, when the line was logged after `abort`)."""
    registry = CollectorRegistry()
    interceptor = RpcInterceptor(Authorizer(None), AuditTrail(MemoryStore()), Metrics(registry))

    async def missing(request: Any, context: Any) -> Any:
        raise errors.NotFound("no stripe integration for org", "integration", "org/stripe")

    async def broken_stream(request: Any, context: Any) -> Any:
        raise errors.Unavailable("the store is unreachable")
        yield  # pragma: no cover  # an async generator, as a streaming handler is

    caplog.set_level("INFO", logger="integrations")
    unary = interceptor.wrapped(GET, grpc.unary_unary_rpc_method_handler(missing))
    assert unary is not None
    handle: Any = unary.unary_unary  # under grpc.aio a coroutine function (the stubs say a plain one)
    context = _Aborting(registry, caplog)
    with pytest.raises(grpc.aio.AbortError):
        await handle(pb.GetProviderConfigRequest(), context)
    assert context.at_abort == (["rpc finished"], 1.0)

    caplog.clear()
    watch = interceptor.wrapped(f"/{SERVICE}/WatchConfigChanges", grpc.unary_stream_rpc_method_handler(broken_stream))
    assert watch is not None
    stream: Any = watch.unary_stream  # an async generator function under grpc.aio
    context = _Aborting(registry, caplog)
    with pytest.raises(grpc.aio.AbortError):
        async for _ in stream(pb.WatchConfigChangesRequest(), context):
            pass  # pragma: no cover
    assert context.code is grpc.StatusCode.UNAVAILABLE
    assert context.at_abort is not None
    assert context.at_abort[0] == ["stream opened", "stream ended"]
