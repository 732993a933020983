"""api.status: every status stays small enough for a client's default metadata limit (8 KiB)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from integrations_service import errors
from integrations_service.api.status import MAX_MESSAGE_BYTES, MAX_VIOLATIONS, to_grpc_status


def trailer_bytes(status: grpc.Status) -> int:
    """What the trailers weigh: grpc-message (percent-encoded past ASCII) plus the base64 details."""
    details = dict(status.trailing_metadata)["grpc-status-details-bin"]
    message = sum(1 if ord(c) < 0x7F else 3 * len(c.encode()) for c in status.details)
    return message + len(details) * 4 // 3


def bad_request(status: grpc.Status) -> error_details_pb2.BadRequest:
    parsed = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    bad = error_details_pb2.BadRequest()
    assert parsed.details[0].Unpack(bad)
    return bad


@pytest.mark.parametrize("text", ["x", "é", "\n", "😀"])
def test_many_huge_violations_are_cut_to_a_small_status_that_says_how_many_were_left_out(text: str) -> None:
    violations = [errors.FieldViolation(f"values.{text * 5000}{i}", text * 5000) for i in range(50)]
    error = errors.InvalidArgument(violations)
    status = to_grpc_status(grpc.StatusCode.INVALID_ARGUMENT, error.message, "rid", error)
    assert len(status.details.encode()) <= MAX_MESSAGE_BYTES
    assert status.details.endswith("more")
    assert trailer_bytes(status) < 6 * 1024
    shown = bad_request(status).field_violations
    assert len(shown) == MAX_VIOLATIONS + 1
    assert shown[-1].description.startswith(f"and {50 - MAX_VIOLATIONS} more")


def test_a_short_status_is_left_as_it_is() -> None:
    error = errors.InvalidArgument([errors.FieldViolation("provider", "is required")])
    status = to_grpc_status(grpc.StatusCode.INVALID_ARGUMENT, error.message, "rid", error)
    assert status.details == "invalid request: provider: is required"
    assert [(v.field, v.description) for v in bad_request(status).field_violations] == [("provider", "is required")]


def test_any_long_message_is_capped() -> None:
    status = to_grpc_status(grpc.StatusCode.NOT_FOUND, "n" * 100_000, "rid", None)
    assert len(status.details.encode()) <= MAX_MESSAGE_BYTES
