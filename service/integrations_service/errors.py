"""The service's one error hierarchy.

Every layer raises these; `api.status` maps each class to a gRPC status code
in one place. Messages are shown to callers and written to logs, so they name
organizations, providers and fields, and never a credential value.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field: its path (e.g. `values.secretKey`) and why."""

    field: str
    description: str


class ServiceError(Exception):
    """Base of every error the service reports to a caller."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    """The request is malformed; `violations` name the offending fields."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(f"invalid request: {summary}")
        self.violations = tuple(violations)


class NotFound(ServiceError):
    """The named provider or stored integration does not exist."""


class Conflict(ServiceError):
    """The stored credentials changed since the caller read them (stale etag)."""


class PermissionDenied(ServiceError):
    """The caller may not make this call."""


class FailedPrecondition(ServiceError):
    """The system is not in a state in which the call can run."""


class Unavailable(ServiceError):
    """A dependency (the store) cannot be reached; the call may be retried."""


class CorruptCredential(ServiceError):
    """A stored value cannot be decrypted: wrong key or tampered row.

    Names where the value sits, never the value.
    """

    def __init__(self, organization_id: str, provider: str, field: str, reason: str) -> None:
        # `reason` comes from crypto's typed errors, whose texts never carry values or keys.
        super().__init__(
            f"stored value of field {field!r} for organization {organization_id!r}, "
            f"provider {provider!r} cannot be decrypted ({reason}); "
            "save a new value for the field to replace it"
        )
        self.organization_id = organization_id
        self.provider = provider
        self.field = field


class ConfigurationError(Exception):
    """A setting is missing or invalid at start-up. Not a request error."""
