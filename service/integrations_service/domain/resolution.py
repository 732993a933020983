"""The effective config: each field from the organization, else the environment, else unset.

Two exceptions, so that nothing of the platform's is ever sent to a server the
organization chose:

- once an organization has stored a field that binds the provider's secrets to
  an endpoint or account (`FieldSpec.binds_secrets`), none of that provider's
  secrets comes from the environment for it. The field-by-field fallback would
  otherwise hand the platform's API key or SMTP password to whatever endpoint
  the organization names;
- once it has stored the endpoint itself (`FieldSpec.endpoint`: Easypay's
  `baseUrl`, the SMTP `host`), no field at all comes from the environment: the
  platform's account id, SMTP user name and sender address would go to that
  server too. The organization supplies the whole configuration, or it is unset.

The other direction stays open: an organization's own secret or account may go
to the platform's configured endpoint.

The masked view shows the organization's own secrets as the mask and their
last 4 characters, the environment's (the platform's) as the mask alone.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from integrations_service.domain.masking import mask_secret
from integrations_service.domain.registry import FieldSpec, ProviderSpec


class ValueSource(enum.Enum):
    ORGANIZATION = "organization"
    ENVIRONMENT = "environment"
    UNSET = "unset"


class ConfigView(enum.Enum):
    MASKED = "masked"
    DECRYPTED = "decrypted"


@dataclass(frozen=True)
class EffectiveValue:
    value: str
    source: ValueSource
    secret: bool


@dataclass(frozen=True)
class EffectiveConfig:
    organization_id: str
    provider: str
    values: Mapping[str, EffectiveValue]
    etag: str
    update_time: datetime | None


def _inherit(spec: ProviderSpec, holds_value: Callable[[str], bool]) -> tuple[bool, bool]:
    """(whether any field, whether the secrets) may come from the environment, given which keys hold a value."""
    if any(holds_value(key) for key in spec.endpoint_keys):
        return False, False
    return True, not any(holds_value(key) for key in spec.binding_keys)


def _fallback(field: FieldSpec, environment: Mapping[str, str], inherit: tuple[bool, bool]) -> str:
    inherit_any, inherit_secrets = inherit
    if not inherit_any or (field.secret and not inherit_secrets):
        return ""
    return environment.get(field.env_var, "")


def resolve_values(
    spec: ProviderSpec,
    organization_values: Mapping[str, str],
    environment: Mapping[str, str],
    view: ConfigView,
) -> dict[str, EffectiveValue]:
    """Every field of the provider, in registry order, shown as `view` asks."""
    # Asked of the few endpoint and binding keys only.
    inherit = _inherit(spec, lambda key: bool(organization_values.get(key)))
    mask = view is ConfigView.MASKED
    resolved: dict[str, EffectiveValue] = {}
    for field in spec.fields:
        if value := organization_values.get(field.key, ""):
            source = ValueSource.ORGANIZATION
        elif value := _fallback(field, environment, inherit):
            source = ValueSource.ENVIRONMENT
        else:
            source = ValueSource.UNSET
        if field.secret and mask:
            # The last 4 characters only of the organization's own secret: the environment's is the platform's,
            # the same for every tenant, and none of them has any business learning part of it.
            value = mask_secret(value, show_tail=source is ValueSource.ORGANIZATION)
        resolved[field.key] = EffectiveValue(value, source, field.secret)
    return resolved


def is_ready(spec: ProviderSpec, stored_keys: frozenset[str], environment: Mapping[str, str]) -> bool:
    """Every required field resolves, and one field of each `ready_needs_one_of` group, under the same rule.

    Needs only which keys are stored, not their values."""
    inherit = _inherit(spec, stored_keys.__contains__)

    def resolves(field: FieldSpec) -> bool:
        return field.key in stored_keys or bool(_fallback(field, environment, inherit))

    return all(resolves(field) for field in spec.fields if field.required) and all(
        any(resolves(field) for field in spec.fields if field.key in group) for group in spec.ready_needs_one_of
    )
