"""The client's error hierarchy: one class per gRPC status the service answers with.

Every error a client method raises for a failed call is an `IntegrationsError`,
built from the call's gRPC status by `error_from_rpc` (the one place that maps
status codes to classes). Messages come from the service, which never puts a
credential value in them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

__all__ = [
    "ClientClosed",
    "ConfigurationError",
    "Conflict",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "IntegrationsError",
    "InternalError",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ProviderNotFound",
    "Unauthenticated",
    "Unavailable",
    "error_from_rpc",
]

REQUEST_ID_KEY = "x-request-id"


class ConfigurationError(ValueError):
    """The client is configured wrongly (environment variables, TLS files); no call was made."""


class IntegrationsError(Exception):
    """Base of every error a call to the service raises.

    `code` is the gRPC status code, `message` the service's (or gRPC's) message,
    `request_id` the id under which the service logged the call ("" when the
    call never reached the service).
    """

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, request_id: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.request_id = request_id

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        return f"{text} (request id {self.request_id})" if self.request_id else text


class InvalidArgument(IntegrationsError):
    """INVALID_ARGUMENT: the request is malformed.

    `field_violations` lists (field, description) pairs from the status's
    `google.rpc.BadRequest` detail, e.g. ("values.secretKey", "must start with sk_test_ ...").
    """

    default_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        request_id: str = "",
        field_violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message, code=code, request_id=request_id)
        self.field_violations: list[tuple[str, str]] = list(field_violations)

    @property
    def fields(self) -> list[str]:
        """The names of the offending fields, in the service's order."""
        return [field for field, _ in self.field_violations]


class NotFound(IntegrationsError):
    """NOT_FOUND: the provider does not exist, or (delete) the organization has no stored credentials for it."""

    default_code = grpc.StatusCode.NOT_FOUND


class ProviderNotFound(NotFound):
    """NOT_FOUND because the provider id is not in the catalog."""


class Conflict(IntegrationsError):
    """ABORTED: the etag is stale; the credentials changed since they were read. Read them again."""

    default_code = grpc.StatusCode.ABORTED


class PermissionDenied(IntegrationsError):
    """PERMISSION_DENIED: this caller may not make this call."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(IntegrationsError):
    """UNAUTHENTICATED: the caller's identity is missing or not accepted."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(IntegrationsError):
    """FAILED_PRECONDITION: the system is not in a state in which the call can run."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(IntegrationsError):
    """UNAVAILABLE: the service (or its store) cannot be reached; the call may be retried later."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(Unavailable):
    """DEADLINE_EXCEEDED: no answer within the call's timeout.

    A subclass of `Unavailable`: for a caller both mean "the service could not
    answer now" (with wait-for-ready, a service that is down shows as this).
    """

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class DataLoss(IntegrationsError):
    """DATA_LOSS: a stored value cannot be decrypted; saving a new value for the field repairs it."""

    default_code = grpc.StatusCode.DATA_LOSS


class ClientClosed(IntegrationsError, RuntimeError):
    """The client is closed: called after `close()`, or a call that `close()` cut short while it was in flight.

    Also a `RuntimeError` (use after close is a programming error). `code` is CANCELLED.
    """

    default_code = grpc.StatusCode.CANCELLED


class InternalError(IntegrationsError):
    """Any other status (INTERNAL, UNKNOWN, ...): a bug; `request_id` finds it in the service's log."""

    default_code = grpc.StatusCode.INTERNAL


_CLASSES: dict[grpc.StatusCode, type[IntegrationsError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ABORTED: Conflict,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.DATA_LOSS: DataLoss,
}

# The service words an unknown provider this way (domain/validation.py); the
# other NOT_FOUND (DeleteIntegration of missing credentials) names the organization.
_UNKNOWN_PROVIDER_PREFIX = "provider "
_PROVIDER_RESOURCE = "integrations.v1.Provider"


class _StatusCarrier(Protocol):
    """What both `grpc.RpcError` (sync) and `grpc.aio.AioRpcError` offer once a call has ended."""

    def code(self) -> grpc.StatusCode: ...

    def details(self) -> str | None: ...

    def trailing_metadata(self) -> Any: ...


def error_from_rpc(error: grpc.RpcError, *, method: str = "") -> IntegrationsError:
    """The `IntegrationsError` for a failed call: the class from the status code, details from the status.

    `method` is the RPC's name (e.g. "DeleteIntegration"): NOT_FOUND is always an
    unknown provider, except from DeleteIntegration, where it may also mean
    "no stored credentials" (then plain `NotFound`).
    """
    call = cast(_StatusCarrier, error)
    code = call.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = (call.details() if callable(getattr(error, "details", None)) else None) or code.name
    violations: list[tuple[str, str]] = []
    request_id = ""
    resource_type = ""
    try:
        status = rpc_status.from_call(cast(grpc.Call, error))
    except (ValueError, AttributeError, TypeError):  # inconsistent or undecodable rich status: keep the basics
        status = None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations.extend((v.field, v.description) for v in bad_request.field_violations)
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            resource = error_details_pb2.ResourceInfo()
            detail.Unpack(resource)
            resource_type = resource.resource_type
        elif detail.Is(error_details_pb2.RequestInfo.DESCRIPTOR):
            info = error_details_pb2.RequestInfo()
            detail.Unpack(info)
            request_id = info.request_id
    if not request_id:
        request_id = _trailer(call, REQUEST_ID_KEY)

    cls = _CLASSES.get(code, InternalError)
    if cls is NotFound and _is_unknown_provider(resource_type, method, message):
        cls = ProviderNotFound
    if cls is InvalidArgument:
        return InvalidArgument(message, code=code, request_id=request_id, field_violations=violations)
    return cls(message, code=code, request_id=request_id)


def _is_unknown_provider(resource_type: str, method: str, message: str) -> bool:
    if resource_type:  # the service's ResourceInfo detail says which resource is missing
        return resource_type == _PROVIDER_RESOURCE
    # An older service without the detail: only DeleteIntegration has another NOT_FOUND, worded differently.
    return method != "DeleteIntegration" or message.startswith(_UNKNOWN_PROVIDER_PREFIX)


def _trailer(call: _StatusCarrier, key: str) -> str:
    try:
        metadata = call.trailing_metadata() or ()
    except (AttributeError, TypeError):
        return ""
    for item_key, value in metadata:
        if item_key == key and isinstance(value, str):
            return value
    return ""
