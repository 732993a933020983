"""The service's one error hierarchy.

Every layer raises these; `api.status` maps each class to a gRPC status code
in one place. Messages are shown to callers and written to logs, so they name
organizations, providers and fields, and never a credential value.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """The named provider or stored integration does not exist.

    `resource_type` and `resource_name` say which (a `google.rpc.ResourceInfo` detail).
    """

    def __init__(self, message: str, resource_type: str, resource_name: str) -> None:
        super().__init__(message)
        self.resource_type = resource_type
        self.resource_name = resource_name


class Conflict(ServiceError):
    """The stored credentials changed since the caller read them (stale etag)."""


class PermissionDenied(ServiceError):
    """The caller may not make this call."""


class FailedPrecondition(ServiceError):
    """The system is not in a state in which the call can run."""


class Unavailable(ServiceError):
    """A dependency (the store) cannot be reached; the call may be retried."""


class StoreRejected(ServiceError):
    """The store is up but refuses to take these records as they are (their data, not its state).

    Retrying the same records cannot succeed; the audit trail splits a refused batch to find the records at fault.
    The message never holds the records' content.
    """


class CorruptCredential(ServiceError):
    """Stored values cannot be decrypted: wrong key, tampered row, or a value moved from elsewhere.

    Names every such field (so one save can replace them all), never a value.
    """

    def __init__(self, organization_id: str, provider: str, fields: Sequence[str], reason: str) -> None:
        # `reason` comes from crypto's typed errors, whose texts never carry values or keys.
        names = ", ".join(repr(name) for name in fields)
        which = f"field {names}" if len(fields) == 1 else f"fields {names}"
        advice = (
            "save a new value for the field to replace it"
            if len(fields) == 1
            else "save new values for all of these fields in one SaveIntegration to replace them"
        )
        super().__init__(
            f"stored value of {which} for organization {organization_id!r}, provider {provider!r} "
            f"cannot be decrypted ({reason}); {advice}"
        )
        self.organization_id = organization_id
        self.provider = provider
        self.fields = tuple(fields)


class CorruptConfig(CorruptCredential):
    """A stored config is not a JSON object of values: nothing in it can be read, so the row is refused whole."""

    def __init__(self, organization_id: str, provider: str, reason: str) -> None:
        # `reason` is the store's fixed text (e.g. "is not a JSON object"), never the row's content.
        ServiceError.__init__(
            self,
            f"the stored config of organization {organization_id!r} for provider {provider!r} {reason}; "
            "delete the integration (DeleteIntegration) and save it again to replace it",
        )
        self.organization_id = organization_id
        self.provider = provider
        self.fields = ()


class ConfigurationError(Exception):
    """A setting is missing or invalid at start-up. Not a request error."""
