"""The one place where service errors become gRPC statuses.

`RpcInterceptor` wraps every unary RPC: it gives the call a request id,
turns `errors.ServiceError` into the matching status with rich details
(`google.rpc.BadRequest` for field violations, `google.rpc.RequestInfo`
always), turns anything unexpected into INTERNAL (logged with the request id,
never UNKNOWN), and writes one log line per RPC.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from integrations_service import errors

log = logging.getLogger("integrations.rpc")

REQUEST_ID_KEY = "x-request-id"
_CALLER_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

_CODES: tuple[tuple[type[errors.ServiceError], grpc.StatusCode], ...] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND),
    (errors.Conflict, grpc.StatusCode.ABORTED),
    (errors.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
    (errors.CorruptCredential, grpc.StatusCode.DATA_LOSS),
)


def status_code_of(error: errors.ServiceError) -> grpc.StatusCode:
    for error_type, code in _CODES:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


def to_grpc_status(code: grpc.StatusCode, message: str, request_id: str, error: Exception | None) -> grpc.Status:
    details = [error_details_pb2.RequestInfo(request_id=request_id)]
    if isinstance(error, errors.InvalidArgument):
        violations = [
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ]
        details.insert(0, error_details_pb2.BadRequest(field_violations=violations))
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=packed))


Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


if TYPE_CHECKING:  # the stubs make it generic; the runtime class is not subscriptable
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _ServerInterceptor = grpc.aio.ServerInterceptor


class RpcInterceptor(_ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        # Under grpc.aio the unary behaviour is a coroutine function taking an aio context.
        behaviour = cast(Handler, handler.unary_unary)
        return grpc.unary_unary_rpc_method_handler(
            _wrap(handler_call_details.method, behaviour),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _CALLER_REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def _wrap(method: str, inner: Handler) -> Handler:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        request_id = _request_id(context)
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            response = await inner(request, context)
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            return response
        except errors.ServiceError as error:
            code = status_code_of(error)
            await _abort(context, to_grpc_status(code, error.message, request_id, error), request_id)
        except grpc.aio.AbortError:
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("unexpected error in %s", method, extra={"request_id": request_id, "rpc": method})
            message = f"internal error; the service logged it with request id {request_id}"
            await _abort(context, to_grpc_status(code, message, request_id, None), request_id)
        finally:
            _log_rpc(method, request, code, started, request_id)
        raise AssertionError("unreachable: abort raises")  # pragma: no cover

    return handle


async def _abort(context: grpc.aio.ServicerContext[Any, Any], status: grpc.Status, request_id: str) -> None:
    trailing = (*status.trailing_metadata, (REQUEST_ID_KEY, request_id))
    await context.abort(status.code, status.details, trailing)


def _log_rpc(method: str, request: Any, code: grpc.StatusCode, started: float, request_id: str) -> None:
    log.info(
        "rpc finished",
        extra={
            "rpc": method,
            "code": code.name,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
            "request_id": request_id,
            # Identifiers only: requests carry secrets in other fields, which are never logged.
            "organization_id": getattr(request, "organization_id", "") or None,
            "provider": getattr(request, "provider", "") or None,
        },
    )
