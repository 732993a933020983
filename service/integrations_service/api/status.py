"""The one place where service errors become gRPC statuses.

Each `errors.ServiceError` class has one status code; every status carries a
`google.rpc.RequestInfo` detail with the request id, and INVALID_ARGUMENT a
`google.rpc.BadRequest` naming each bad field.

Every status stays small enough for any client's default metadata limit
(8 KiB for grpc-message plus grpc-status-details-bin): the message is capped
at `MAX_MESSAGE_BYTES`, at most `MAX_VIOLATIONS` violations are listed (then
one saying how many more), and each is cut to a few hundred bytes. Even all
non-ASCII (which grpc-message percent-encodes) the trailer stays under 6 KiB.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from integrations_service import errors
from integrations_service.untrusted import bounded

MAX_MESSAGE_BYTES = 600
MAX_VIOLATIONS = 8
_MAX_FIELD_BYTES = 80
_MAX_DESCRIPTION_BYTES = 200

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
        shown = _shown_violations(error.violations)
        message = _summary(shown, len(error.violations))
        violations = [
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description) for v in shown
        ]
        details.insert(0, error_details_pb2.BadRequest(field_violations=violations))
    if isinstance(error, errors.NotFound):
        details.insert(
            0,
            error_details_pb2.ResourceInfo(
                resource_type=error.resource_type, resource_name=fit(error.resource_name, _MAX_FIELD_BYTES * 4)
            ),
        )
    message = fit(message, MAX_MESSAGE_BYTES)
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=packed))


def fit(text: str, max_bytes: int) -> str:
    """`text` bounded (controls escaped, cut with a marker) to at most `max_bytes` of UTF-8."""
    limit = max_bytes
    while len(fitted := bounded(text, limit).encode()) > max_bytes and limit > 0:
        limit = limit * 3 // 4
    return fitted.decode()


def _summary(shown: list[errors.FieldViolation], total: int) -> str:
    """As many violations as fit the message, then how many more the BadRequest detail (or a retry) shows."""
    parts: list[str] = []
    used = 0
    for violation in shown[: min(total, MAX_VIOLATIONS)]:
        part = f"{violation.field}: {violation.description}"
        used += len(part.encode()) + 2
        if parts and used > MAX_MESSAGE_BYTES - 80:
            break
        parts.append(part)
    more = f"; and {total - len(parts)} more" if total > len(parts) else ""
    return f"invalid request: {'; '.join(parts)}{more}"


def _shown_violations(violations: tuple[errors.FieldViolation, ...]) -> list[errors.FieldViolation]:
    """The first `MAX_VIOLATIONS`, each cut to size, then one saying how many were left out."""
    shown = [
        errors.FieldViolation(fit(v.field, _MAX_FIELD_BYTES), fit(v.description, _MAX_DESCRIPTION_BYTES))
        for v in violations[:MAX_VIOLATIONS]
    ]
    hidden = len(violations) - MAX_VIOLATIONS
    if hidden > 0:
        shown.append(errors.FieldViolation("request", f"and {hidden} more problems; fix these and send again"))
    return shown
