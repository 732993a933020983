"""The one place where service errors become gRPC statuses.

Each `errors.ServiceError` class has one status code; every status carries a
`google.rpc.RequestInfo` detail with the request id, and INVALID_ARGUMENT a
`google.rpc.BadRequest` naming each bad field.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from integrations_service import errors

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
    if isinstance(error, errors.NotFound):
        details.insert(
            0, error_details_pb2.ResourceInfo(resource_type=error.resource_type, resource_name=error.resource_name)
        )
    packed = []
    for detail in details:
        any_detail = any_pb2.Any()
        any_detail.Pack(detail)
        packed.append(any_detail)
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=message, details=packed))
