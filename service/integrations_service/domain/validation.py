"""Request checks that run before anything is read or written.

Each check names the request field it objects to, with paths such as
`organization_id`, `values.secretKey` or `clear_fields[1]`. Problems are
collected, so one reply lists every bad field at once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from integrations_service.domain.masking import MASK_CHAR
from integrations_service.domain.registry import ProviderSpec, find_provider
from integrations_service.errors import FieldViolation, InvalidArgument, NotFound
from integrations_service.untrusted import bounded

# Organization ids are the dashboard's, opaque to this service: 1-128 printable characters, no whitespace
# (so no control characters either), as every id stored so far has been.
MAX_ORGANIZATION_ID_LENGTH = 128
# Provider ids are this service's own catalog keys (docs/api.md, "Limits").
MAX_PROVIDER_ID_LENGTH = 64
_PROVIDER_ID = re.compile(rf"[a-z0-9_]{{1,{MAX_PROVIDER_ID_LENGTH}}}")
# How much of a caller's field key an error message echoes.
_ECHOED_KEY_LENGTH = 64
# google.rpc.ResourceInfo types of NOT_FOUND errors.
PROVIDER_RESOURCE = "integrations.v1.Provider"
INTEGRATION_RESOURCE = "integrations.v1.Integration"
MAX_VALUE_BYTES = 4096


def organization_id_problem(organization_id: str) -> str | None:
    if not organization_id:
        return "is required"
    if len(organization_id) > MAX_ORGANIZATION_ID_LENGTH:
        return f"must be at most {MAX_ORGANIZATION_ID_LENGTH} characters"
    if not _printable_without_whitespace(organization_id):
        return "must be printable characters without whitespace"
    return None


def _printable_without_whitespace(text: str) -> bool:
    if not text.isprintable():
        return False
    # The space is the only printable ASCII whitespace: for the ASCII ids of nearly every request, one
    # substring test instead of a scan character by character.
    if text.isascii():
        return " " not in text
    return not any(c.isspace() for c in text)


def provider_id_problem(provider_id: str) -> str | None:
    if not provider_id:
        return "is required"
    if not _PROVIDER_ID.fullmatch(provider_id):
        return f"must be 1 to {MAX_PROVIDER_ID_LENGTH} characters of a-z, 0-9 and _"
    return None


def check_organization_id(organization_id: str) -> None:
    if problem := organization_id_problem(organization_id):
        raise InvalidArgument([FieldViolation("organization_id", problem)])


def check_target(organization_id: str, provider_id: str) -> ProviderSpec:
    """Validate the organization id and provider of a request; NOT_FOUND for an unknown provider."""
    violations = []
    if problem := organization_id_problem(organization_id):
        violations.append(FieldViolation("organization_id", problem))
    if problem := provider_id_problem(provider_id):
        violations.append(FieldViolation("provider", problem))
    if violations:
        raise InvalidArgument(violations)
    spec = find_provider(provider_id)
    if spec is None:
        raise NotFound(
            f"provider {provider_id!r} does not exist; ListProviders shows the catalog",
            resource_type=PROVIDER_RESOURCE,
            resource_name=provider_id,
        )
    return spec


def check_changes(spec: ProviderSpec, values: Mapping[str, str], clear_fields: Sequence[str]) -> None:
    """Every set value and cleared field must be a known, well-formed field of the provider."""
    violations = [v for key, value in values.items() if (v := _value_violation(spec, key, value))]
    seen: set[str] = set()
    for index, key in enumerate(clear_fields):
        path = f"clear_fields[{index}]"
        if spec.field(key) is None:
            violations.append(FieldViolation(path, _unknown_field(spec, key)))
        elif key in values:
            violations.append(FieldViolation(path, f"field {key!r} is both set in values and cleared"))
        elif key in seen:
            violations.append(FieldViolation(path, f"field {key!r} is cleared twice"))
        seen.add(key)
    if not values and not clear_fields:
        violations.append(FieldViolation("values", "set at least one value or name a field in clear_fields"))
    if violations:
        raise InvalidArgument(violations)


def check_cross_field_rules(spec: ProviderSpec, stored_clear_values: Mapping[str, str]) -> None:
    """Rules spanning fields, checked on the organization's values as they would be stored."""
    violations = [
        FieldViolation(f"values.{key}", problem)
        for cross_check in spec.cross_checks
        for key, problem in cross_check(stored_clear_values)
    ]
    if violations:
        raise InvalidArgument(violations)


def _value_violation(spec: ProviderSpec, key: str, value: str) -> FieldViolation | None:
    field = spec.field(key)
    if field is None:
        return FieldViolation(f"values.{bounded(key, _ECHOED_KEY_LENGTH)}", _unknown_field(spec, key))
    path = f"values.{key}"
    if not value:
        return FieldViolation(path, "is empty; to remove a value name the field in clear_fields")
    if MASK_CHAR in value:
        return FieldViolation(
            path, "contains '•', so it looks like a masked value sent back; omit the field to keep the stored secret"
        )
    if len(value.encode("utf-8")) > MAX_VALUE_BYTES:
        return FieldViolation(path, f"is longer than {MAX_VALUE_BYTES} bytes")
    if (control := _control_character(value)) is not None:
        # A CR/LF in an endpoint or sender address becomes a header injection wherever the value is used.
        return FieldViolation(path, f"contains the control character U+{ord(control):04X}; values are single-line text")
    if field.check and (problem := field.check(value)):
        return FieldViolation(path, problem)
    return None


def _control_character(value: str) -> str | None:
    """The first control character in `value`, if any: C0 (CR, LF, NUL, TAB, ESC, ...), DEL, C1 (NEL, CSI, ...)
    or the Unicode line and paragraph separators (U+2028, U+2029), which break lines for many parsers too."""
    if value.isascii():
        return next((char for char in value if char < " " or char == "\x7f"), None)
    return next((char for char in value if char < " " or "\x7f" <= char <= "\x9f" or char in "\u2028\u2029"), None)


def _unknown_field(spec: ProviderSpec, key: str) -> str:
    known = ", ".join(f.key for f in spec.fields)
    return f"'{bounded(key, _ECHOED_KEY_LENGTH)}' is not a field of {spec.id} (fields: {known})"
